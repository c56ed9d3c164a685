"""The search's frozen judges: trained once per search on original images, stored, and shared with every trial.

The driver trains them in one Ray task (it may ask for a GPU; on KubeRay the head has no CPUs for work), writes
them to ``{storage}/{name}/judges.pt`` so a resumed search reuses them, and ``ray.put``s them once; each trial reads
that one object. ``token`` is a random id minted when they are trained: every trial reports it, so a search whose
trials all report the driver's token provably scored with one set of judges.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pprl import storage
from pprl.data.dataset import Dataset
from pprl.evaluate.classifiers import FitSpec, Fitted, build
from pprl.evaluate.judges import Judges, train_judges
from pprl.tune.objective import ValidationSet

log = logging.getLogger(__name__)

JUDGES_FILE = "judges.pt"


@dataclass
class SharedJudges:
    judges: Judges
    token: str  # minted once per training of the judges
    settings: dict[str, Any]  # what they were trained on; a resumed search reuses them only if these match
    reference: dict[str, float]  # their accuracy on the original validation images (the unconstrained upper bound)

    def to(self, device: str | torch.device) -> SharedJudges:
        self.judges.to(device)
        return self


def train_shared(view: Dataset, settings: dict[str, Any], val: ValidationSet) -> SharedJudges:
    """Train both judges on the view's train split (originals only) and measure them on the original validation images."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    judges = train_judges(
        view,
        size=settings["size"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        train_limit=settings["limit"],
        seed=settings["seed"],
    )
    reference = {
        "identity_acc": judges.identity_accuracy(val.images, val.identity),
        "expression_acc": judges.expression_accuracy(val.images, val.expression),
    }
    log.info("judges trained: on original validation images identity %.3f, expression %.3f", reference["identity_acc"], reference["expression_acc"])
    return SharedJudges(judges.to("cpu"), uuid.uuid4().hex, dict(settings), reference)


def save(shared: SharedJudges, uri: str) -> None:
    j = shared.judges
    state = {
        "token": shared.token,
        "settings": shared.settings,
        "reference": shared.reference,
        "size": j.size,
        "identity": _fitted_state(j.identity),
        "expression": _fitted_state(j.expression),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())


def load(uri: str) -> SharedJudges:
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{uri}: not a judges file written by pprl tune ({err}); delete it to retrain the judges") from None
    size = int(state["size"])
    judges = Judges(_fitted(state["identity"], size), _fitted(state["expression"], size), size)
    return SharedJudges(judges, state["token"], state["settings"], state["reference"])


def _fitted_state(fitted: Fitted) -> dict[str, Any]:
    return {
        "spec": asdict(fitted.spec),
        "model": {k: v.cpu() for k, v in fitted.model.state_dict().items()},
        "num_classes": fitted.num_classes,
        "best_epoch": fitted.best_epoch,
        "val_accuracy": fitted.val_accuracy,
    }


def _fitted(state: dict[str, Any], size: int) -> Fitted:
    spec = FitSpec(**state["spec"])
    model = build(spec.arch, state["num_classes"], (size, size, 3))
    model.load_state_dict(state["model"])
    model.eval()
    return Fitted(spec, model, state["num_classes"], state["best_epoch"], state["val_accuracy"])


def fingerprint(images: np.ndarray) -> str:
    """A short content hash of the validation images (part of the judges' settings)."""
    return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]

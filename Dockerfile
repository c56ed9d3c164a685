# pprl runtime image for KubeRay: the official Ray image (Ray 2.60.0, Python 3.11, CUDA) plus torch 2.13.0
# (CUDA build), NVIDIA DALI for CUDA 12 and the pprl package with its jobs/.
#   docker build -t REGISTRY/pprl:TAG .
# The manifests name this image once: `images:` in k8s/base/kustomization.yaml (docs/kubernetes.md).
FROM rayproject/ray:2.60.0-py311-gpu

# torch first, in a layer of its own: the largest dependency and the one that changes least. On Linux x86_64
# the wheel on PyPI is the CUDA build and brings its CUDA runtime libraries along.
RUN pip install --no-cache-dir torch==2.13.0

# Only what the package and the jobs need (.dockerignore keeps everything else out of the build context).
# Copied as the image's unprivileged user "ray" (uid 1000, group users) so pip can build in place.
COPY --chown=1000:100 pyproject.toml README.md /home/ray/pprl/
COPY --chown=1000:100 platform /home/ray/pprl/platform
COPY --chown=1000:100 jobs /home/ray/pprl/jobs

# RayJob entrypoints say `python jobs/train.py ...`: Ray runs a job's driver in the directory `ray start`
# was run from, which is this one.
WORKDIR /home/ray/pprl
# = `pip install .[dali]` (the "./" spelling tells hadolint this is a local path, not an unpinned package).
# The base image's ray 2.60.0 satisfies the package's ray pin, so only its missing extras are added.
RUN pip install --no-cache-dir "./[dali]"

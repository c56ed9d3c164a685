import urllib.request


def test_ray_head_answers(ray_head):
    with urllib.request.urlopen(f"{ray_head['dashboard']}/api/version", timeout=5) as r:
        assert r.status == 200

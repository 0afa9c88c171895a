"""The site's image catalogue (vjobs/images/catalogue.py), as a job meets it: an image it does not list, and one
whose files are not what the catalogue's sums say, are setup errors with a result, before any VM."""

from __future__ import annotations

import vjobs


def test_unknown_image_is_a_setup_error(tmp_path, make_site, make_job):
    result = vjobs.run(make_job(["true"], id="a", image="nope"), site=make_site(), driver="qemu_user",
                       outdir=tmp_path / "out")
    assert result.status == "setup_error"
    assert result.error["code"] == "image_not_found"
    assert "'nope' is not in this site's catalogue" in result.error["message"]
    assert (tmp_path / "out" / "result.json").exists()


def test_image_checksum_mismatch(tmp_path, make_site, make_job, fake_image):
    site = make_site(images={"bad": {**fake_image, "kernel_sha256": "0" * 64}})
    result = vjobs.run(make_job(["true"], id="a", image="bad"), site=site, driver="qemu_user",
                       outdir=tmp_path / "out")
    assert result.error["code"] == "image_error" and "the catalogue says 000" in result.error["message"]

"""Suite-wide settings: offline model hubs, clean CUDA skips, and README's first command built in
the background.

Notebooks run at full size by default (``Q4LAB_FAST`` is not set here; the tests that run a notebook
a second time, the browser and Binder ones, set it for themselves). Tests marked ``cuda`` are
skipped with a reason when torch sees no GPU (CI has none). When tests that need the venv of
README's first command (fixture ``first_command_venv``, tests/test_binder.py) are selected, that
venv's build starts as soon as collection ends, in the background (tests/readme_venv.py), and those
tests run last, so the session does not wait for pip at its start."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import readme_venv  # noqa: E402

VENV_FIXTURE = "first_command_venv"
_BUILD = pytest.StashKey()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only for tests that will run
def pytest_collection_modifyitems(config, items):
    """Skip ``cuda`` tests without a GPU; move the tests that need README's venv to the end and
    start building that venv now."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    needs = [i for i in items if VENV_FIXTURE in getattr(i, "fixturenames", ())
             and not i.get_closest_marker("skip")]
    if needs and not config.option.collectonly:
        items[:] = [i for i in items if i not in needs] + needs
        config.stash[_BUILD] = readme_venv.FirstCommandBuild()


def pytest_sessionfinish(session):
    build = session.config.stash.get(_BUILD, None)
    if build is not None:
        build.remove()


@pytest.fixture(scope="session")
def first_command_venv(request):
    """The venv made by README's first command's install part, verbatim (its ``.venv`` moved to
    a temporary directory): the background build, waited for (started here if collection did
    not start it)."""
    build = request.config.stash.get(_BUILD, None)
    if build is None:
        build = request.config.stash[_BUILD] = readme_venv.FirstCommandBuild()
    return build.wait()

"""Every Python snippet of the README runs as written, pasted in order."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.filterwarnings("ignore::mtia_jax.errors.MTIAHostFallbackWarning")
def test_readme_snippets_run_in_order(capsys):
    code = snippets()
    assert len(code) >= 3
    namespace: dict = {}
    for i, snippet in enumerate(code):
        try:
            exec(compile(snippet, f"README.md snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # the failing snippet, in the message
            pytest.fail(f"README snippet {i + 1} fails: {type(e).__name__}: {e}\n{snippet}")
    assert "modeled" in capsys.readouterr().out  # the cost table printed

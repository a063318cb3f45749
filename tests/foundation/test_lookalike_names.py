"""A name, label key or label value refused for a character a reader cannot see is wrong:
a Cyrillic 'р' that looks like the Latin 'p' ('раris'), a zero-width space a copy from a
chat brought along, a decomposed 'é' (e and a combining accent), a non-breaking space. The
refusal names the first such character by its position, code point and Unicode name, so
the operator sees what to retype."""

from __future__ import annotations

import pytest

from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestError


def site(name: str, labels: str = "{}") -> str:
    return f"""apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {{name: "{name}", labels: {labels}}}
spec:
  tier: edge
  location: {{country: FR, lat: 48.85, lon: 2.35}}
  capacity: {{cpu: 4, memoryGiB: 8}}
"""


@pytest.mark.parametrize(("text", "field", "said"), [
    (site("раris"), "metadata.name",
     "'раris' is not valid: use lowercase letters, digits and '-' (a DNS label, at most 63 characters); "
     "its character 1 is U+0440 CYRILLIC SMALL LETTER ER, not ASCII"),
    (site("paris\u200b"), "metadata.name", "its character 6 is U+200B ZERO WIDTH SPACE, not ASCII"),
    (site("cafe\u0301"), "metadata.name", "its character 5 is U+0301 COMBINING ACUTE ACCENT, not ASCII"),
    (site("paris", '{"zone": "eu\u00a0west"}'), "metadata.labels.zone", "its character 3 is U+00A0 NO-BREAK SPACE, not ASCII"),
    (site("paris", '{"zоne": "eu"}'), "metadata.labels", "its character 2 is U+043E CYRILLIC SMALL LETTER O, not ASCII"),
])
def test_a_character_no_reader_can_tell_is_named(text: str, field: str, said: str) -> None:
    with pytest.raises(ManifestError) as refused:
        loader.load_text(text, "site.yaml")
    (issue,) = refused.value.issues
    assert issue.field.startswith(field) and said in issue.message, issue


def test_an_ascii_mistake_is_said_as_before() -> None:
    with pytest.raises(ManifestError) as refused:
        loader.load_text(site("Paris"), "site.yaml")
    (issue,) = refused.value.issues
    assert issue.message == "'Paris' is not valid: use lowercase letters, digits and '-' (a DNS label, at most 63 characters)"


def test_a_field_that_takes_any_script_does_not_blame_its_letters() -> None:
    """An LLM's source is any text without blanks ('/models/modèle 7b' fails for its space):
    naming 'è' as the character at fault would send the operator after the wrong one."""
    from .test_llm_manifests import V, llm_model

    with pytest.raises(ManifestError) as refused:
        loader.load_text(llm_model((f"{V}.llm.source", "/models/modèle 7b")), "model.yaml")
    (issue,) = refused.value.issues
    assert issue.field == f"{V}.llm.source" and "not ASCII" not in issue.message, issue

"""The email fast path gives the email-validator library's verdict and spelling, address by address."""

import email_validator
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.validation import normalized_email

_LOCAL_ALPHABET = "abcz09.!#$%&'*+/=?^_`{|}~-\"(),:;<>@[\\] é"
_DOMAIN_LABELS = st.sampled_from(
    ["example", "com", "co", "uk", "a", "xn--bcher-kva", "bücher", "-bad", "bad-", "1", "123", "localhost",
     "invalid", "test", "x" * 63, "x" * 64, "", "ex_ample", "münchen", "de"]
)


def library(email: str) -> str | None:
    try:
        return str(email_validator.validate_email(email, check_deliverability=False).normalized).lower()
    except email_validator.EmailNotValidError:
        return None


def ours(email: str) -> str | None:
    try:
        return normalized_email(email)
    except email_validator.EmailNotValidError:
        return None


@settings(max_examples=400, deadline=None)
@given(
    local=st.text(alphabet=_LOCAL_ALPHABET, min_size=0, max_size=70),
    labels=st.lists(_DOMAIN_LABELS, min_size=1, max_size=4),
)
@example(local="a" * 64, labels=["x" * 63, "x" * 63, "x" * 57, "com"])  # 254 characters in all
@example(local="a" * 64, labels=["x" * 63, "x" * 63, "x" * 58, "com"])  # 255
@example(local="a" * 65, labels=["example", "com"])
@example(local="a..b", labels=["example", "com"])
@example(local=".a", labels=["example", "com"])
def test_fast_path_agrees_with_the_library(local: str, labels: list[str]) -> None:
    email = f"{local}@{'.'.join(labels)}"
    assert ours(email) == library(email), email


def test_plain_addresses_keep_their_spelling_and_idna_domains_take_the_unicode_one() -> None:
    assert normalized_email("alice.smith+tag@example.com") == "alice.smith+tag@example.com"
    assert normalized_email("a@xn--bcher-kva.de") == "a@bücher.de"

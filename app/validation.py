"""Decoding and checking a ticket body: every problem reported at once, in the contract's codes."""

import functools
import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal

import email_validator
import msgspec

from app.errors import InvalidBody, Issue

Priority = Literal["low", "normal", "high", "urgent"]
MAX_BODY_BYTES: Final = 1024 * 1024
MAX_ID: Final = (1 << 63) - 1
# The body's limits, in Unicode code points, declared once: the checks below enforce them, and the OpenAPI
# document publishes them through TicketIn's annotations.
EMAIL_MAX: Final = 255
NAME_MAX: Final = 120
SUBJECT_MAX: Final = 500
BODY_MAX: Final = 50_000
# A body the fast decoder cannot read is parsed by the json module only if it holds at most this many
# JSON values (counted from above by its commas and brackets): json builds every value, about a
# microsecond each, so this bounds the cost of any body to a few creates' worth.
MAX_VALUES: Final = 20_000
_BAD_CHARACTER: Final = re.compile("[\x00\ud800-\udfff]")  # PostgreSQL text cannot hold these
_DIGITS: Final = re.compile(r"[0-9]+")


def _doc(description: str, **schema: Any) -> msgspec.Meta:
    """JSON Schema annotations for the OpenAPI document. Lengths are checked after trimming, so they
    are documented here and enforced in check_ticket rather than by the decoder."""
    return msgspec.Meta(description=description, extra_json_schema=schema)


class TicketIn(msgspec.Struct, kw_only=True):
    """The body of POST /api/v1/tickets. Unknown fields are ignored; null means absent."""

    email: Annotated[str, _doc("Requester's address; trimmed and lowercased.", maxLength=EMAIL_MAX, format="email")]
    name: Annotated[str, _doc("Used only when the requester is created.", maxLength=NAME_MAX)] | None = None
    subject: Annotated[str, _doc("Trimmed.", minLength=1, maxLength=SUBJECT_MAX)]
    body: Annotated[str, _doc("The first public message, kept verbatim; not blank.", minLength=1, maxLength=BODY_MAX)]
    priority: Priority | None = None
    departmentId: Annotated[str, _doc("Numeric id.", pattern="^[0-9]+$")] | None = None
    ticketTypeId: Annotated[str, _doc("Numeric id.", pattern="^[0-9]+$")] | None = None


class NewTicket(msgspec.Struct, frozen=True):
    """A checked ticket body, normalized and ready to write."""

    email: str
    domain: str
    name: str
    subject: str
    body: str
    priority: str
    department_id: int | None
    ticket_type_id: int | None


_decode_ticket: Final = msgspec.json.Decoder(TicketIn).decode
_FIELDS: Final = msgspec.structs.fields(TicketIn)
# TicketIn's fields as raw JSON, each to be decoded on its own: every other field is skipped by msgspec
# without being built, so a body's unknown fields cost only a scan however large they are.
_RawFields: Final = msgspec.defstruct("RawTicketFields", [(f.encode_name, msgspec.Raw, msgspec.Raw()) for f in _FIELDS])
_decode_raw_fields: Final = msgspec.json.Decoder(_RawFields).decode
_decode_raw: Final = msgspec.json.Decoder(msgspec.Raw).decode
_FIELD_ORDER: Final = {f.encode_name: i for i, f in enumerate(_FIELDS)}
_BAD: Final = object()  # a field whose type was wrong and is already reported


def _issue(field: str | int, code: str, message: str) -> Issue:
    return Issue([field], code, message)


def decode_object(body: bytes, issues: Sequence[Issue] = ()) -> dict[str, Any]:
    """Parse a JSON object strictly as UTF-8, keeping lone surrogates so they can be reported, within
    MAX_VALUES. A failure lists the issues already found (headers) before its own."""
    if body.count(b",") + body.count(b"[") + body.count(b"{") > MAX_VALUES:
        message = f"The body holds more than {MAX_VALUES} JSON values, or is not valid JSON."
        raise InvalidBody("The body is not a ticket.", [*issues, Issue([], "malformed_json", message)])
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidBody(
            "The body is not valid JSON.", [*issues, Issue([], "malformed_json", str(exc)[:200])]
        ) from None
    if not isinstance(value, dict):
        raise InvalidBody(
            "The body must be a JSON object.", [*issues, Issue([], "not_an_object", "Expected an object.")]
        )
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _typed_fields(obj: dict[str, Any], issues: list[Issue]) -> dict[str, Any]:
    """Each TicketIn field of a decoded object, converted by msgspec to its declared type, or _BAD."""
    values: dict[str, Any] = {}
    for field in _FIELDS:
        raw = obj.get(field.encode_name)
        if raw is None:
            values[field.name] = _absent(field, issues)
            continue
        try:
            values[field.name] = msgspec.convert(raw, field.type)
        except UnicodeEncodeError:  # msgspec cannot convert a string holding a lone surrogate
            values[field.name] = _BAD
            message = f"{field.encode_name} contains U+0000 or an unpaired surrogate."
            issues.append(_issue(field.encode_name, "invalid_character", message))
        except msgspec.ValidationError:
            values[field.name] = _BAD
            issues.append(_wrong_type(field, isinstance(raw, str)))
    return values


def ticket_from_object(value: Any) -> NewTicket:
    """Check one already-decoded JSON value as a ticket body; raise InvalidBody listing every problem."""
    if not isinstance(value, dict):
        raise InvalidBody("The ticket must be a JSON object.", [Issue([], "not_an_object", "Expected an object.")])
    issues: list[Issue] = []
    return check_ticket(_typed_fields(value, issues), issues)


def parse_ticket(body: bytes, extra_issues: list[Issue] | None = None) -> NewTicket:
    """Decode and check a POST /api/v1/tickets body; raise InvalidBody listing every problem."""
    issues: list[Issue] = list(extra_issues or ())
    try:
        ticket = _decode_ticket(body)
        values: dict[str, Any] = {f.name: getattr(ticket, f.name) for f in _FIELDS}
    except msgspec.ValidationError:  # a field of the wrong type, or not an object: read field by field
        values = _fields_leniently(body, issues)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # no second scan reads it either
        values = _unreadable(body, exc, issues)
    return check_ticket(values, issues)


def _fields_leniently(body: bytes, issues: list[Issue]) -> dict[str, Any]:
    """The slow path of a body the fast decoder refused: each TicketIn field decoded on its own from
    its raw JSON, without a second full parse. Only a body msgspec cannot read at all and that holds a
    surrogate escape (msgspec refuses lone surrogates, which must be reported as invalid_character) goes
    to the json module, within MAX_VALUES."""
    try:
        body.decode("utf-8")  # the json module's verdict: a body that is not UTF-8 is malformed
        raw = _decode_raw_fields(body)
    except msgspec.ValidationError:  # not an object: is it JSON at all?
        try:
            _decode_raw(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            return _unreadable(body, exc, issues)
        raise InvalidBody(
            "The body must be a JSON object.", [*issues, Issue([], "not_an_object", "Expected an object.")]
        ) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return _unreadable(body, exc, issues)
    values: dict[str, Any] = {}
    for field in _FIELDS:
        text = bytes(getattr(raw, field.encode_name))
        if text in (b"", b"null"):
            values[field.name] = _absent(field, issues)
            continue
        try:
            values[field.name] = msgspec.json.decode(text, type=field.type)
        except msgspec.ValidationError:
            values[field.name] = _BAD
            issues.append(_wrong_type(field, text.startswith(b'"')))
    return values


def _unreadable(body: bytes, exc: Exception, issues: list[Issue]) -> dict[str, Any]:
    """A body msgspec cannot read: malformed, or holding an escaped surrogate that json reads."""
    if b"\\ud" in body or b"\\uD" in body:  # JSON writes the escape with a lowercase u
        return _typed_fields(decode_object(body, issues), issues)
    detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
    raise InvalidBody("The body is not valid JSON.", [*issues, Issue([], "malformed_json", detail)]) from None


def _absent(field: msgspec.structs.FieldInfo, issues: list[Issue]) -> Any:
    if not field.required:
        return None
    issues.append(_issue(field.encode_name, "required", f"{field.encode_name} is required."))
    return _BAD


def _wrong_type(field: msgspec.structs.FieldInfo, is_string: bool) -> Issue:
    if field.name == "priority" and is_string:
        return _issue("priority", "invalid_enum", "priority must be low, normal, high or urgent.")
    return _issue(field.encode_name, "invalid_type", f"{field.encode_name} must be a string.")


def check_ticket(values: dict[str, Any], issues: list[Issue]) -> NewTicket:
    email = _check_email(values["email"], issues)
    name = _check_text(values["name"], "name", issues, trim=True, required=False, max_length=NAME_MAX)
    subject = _check_text(values["subject"], "subject", issues, trim=True, required=True, max_length=SUBJECT_MAX)
    body = _check_text(values["body"], "body", issues, trim=False, required=True, max_length=BODY_MAX)
    department_id = _check_id(values["departmentId"], "departmentId", issues)
    ticket_type_id = _check_id(values["ticketTypeId"], "ticketTypeId", issues)
    if issues:
        issues.sort(key=lambda issue: _FIELD_ORDER.get(str(issue.path[0]) if issue.path else "", -1))
        raise InvalidBody(issues=issues)
    assert isinstance(email, str) and isinstance(subject, str) and isinstance(body, str)
    local, _, domain = email.rpartition("@")
    return NewTicket(
        email=email,
        domain=domain,
        name=name or local,
        subject=subject,
        body=body,
        priority=values["priority"] or "normal",
        department_id=department_id,
        ticket_type_id=ticket_type_id,
    )


def _check_email(value: Any, issues: list[Issue]) -> str | None:
    if value is _BAD:
        return None
    email = value.strip().lower()
    if _BAD_CHARACTER.search(email):
        issues.append(_issue("email", "invalid_character", "email contains U+0000 or an unpaired surrogate."))
    elif len(email) > EMAIL_MAX:
        issues.append(_issue("email", "too_long", f"email must be at most {EMAIL_MAX} characters."))
    else:
        try:
            return normalized_email(email)
        except email_validator.EmailNotValidError as exc:
            issues.append(_issue("email", "invalid_email", f"email is not a valid address: {exc}"))
    return None


# The local part of a plain address: dot-atom of RFC 5322 (lowercase), as email-validator accepts it.
_DOT_ATOM: Final = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


@functools.lru_cache(maxsize=4096)
def _plain_domain(domain: str) -> bool:
    """Whether email-validator accepts an address at this domain and keeps the domain as it is."""
    try:
        return email_validator.validate_email("a@" + domain, check_deliverability=False).domain == domain
    except email_validator.EmailNotValidError:
        return False


def normalized_email(email: str) -> str:
    """A lowercased address as email-validator judges and normalizes it, or EmailNotValidError.

    One spelling per address: an IDNA (xn--) domain is kept in its Unicode form, as the blocklist
    keeps its entries, so neither spelling slips past the other. Most addresses are a plain ASCII
    local part at a domain seen before: those take a fast path whose verdict is the library's own
    (tests/test_email_fast_path.py compares them), the domain's cached; the rest go to the library.
    """
    local, _, domain = email.rpartition("@")
    if len(email) <= 254 and len(local) <= 64 and _DOT_ATOM.fullmatch(local) and _plain_domain(domain):
        return email
    return str(email_validator.validate_email(email, check_deliverability=False).normalized).lower()


def _check_text(
    value: Any, field: str, issues: list[Issue], *, trim: bool, required: bool, max_length: int
) -> str | None:
    if value is _BAD or value is None:
        return None
    text = value.strip() if trim else value
    if _BAD_CHARACTER.search(text):
        issues.append(_issue(field, "invalid_character", f"{field} contains U+0000 or an unpaired surrogate."))
    elif required and not text.strip():
        issues.append(_issue(field, "too_short", f"{field} must not be empty or blank."))
    elif len(text) > max_length:
        issues.append(_issue(field, "too_long", f"{field} must be at most {max_length} characters."))
    else:
        return str(text) or None
    return None


def _check_id(value: Any, field: str, issues: list[Issue]) -> int | None:
    if value is _BAD or value is None:
        return None
    digits = value.lstrip("0")  # leading zeros are accepted; int() refuses strings over 4300 digits long
    if _DIGITS.fullmatch(value) and len(digits) <= 19 and 0 < int(digits or "0") <= MAX_ID:
        return int(digits)
    issues.append(_issue(field, "invalid_id", f"{field} must be a string of digits naming a positive 64-bit id."))
    return None

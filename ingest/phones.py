"""Phone numbers to E.164, fast for the common shapes, with phonenumbers as the authority.

phonenumbers costs about 20 µs a number, most of a core at intake rates. Most real numbers are
mobiles of the default region written as digits with spaces or dashes, optionally behind
`+CC` or `00CC`; for exactly those, `PhoneNormaliser` matches the region's own mobile pattern
taken from phonenumbers' metadata, so it accepts a number only where phonenumbers would call it
a valid mobile of that region (a property test holds it to that). Everything else goes to
phonenumbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import phonenumbers
from phonenumbers import timezone as phone_timezone

_SEPARATORS = str.maketrans("", "", " -().\u00a0\t")
_DIGITS = re.compile(r"\+?\d{6,20}")


@dataclass(frozen=True, slots=True)
class Phone:
    e164: str
    region: str | None  # ISO 3166-1 region of the number
    timezone: str | None  # IANA, when the number pins one down


class InvalidPhone(ValueError):
    """The text cannot be a dialable phone number; the message says why."""


@lru_cache(maxsize=4096)
def _timezone_of(e164: str) -> str | None:
    zones = phone_timezone.time_zones_for_number(phonenumbers.parse(e164))
    return zones[0] if zones and zones[0] != "Etc/Unknown" else None


class PhoneNormaliser:
    """Normalise phone text for one default region (the region of numbers with no `+CC`)."""

    def __init__(self, default_region: str) -> None:
        self.region = default_region.upper()
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(self.region)
        if metadata is None:
            raise ValueError(f"unknown region {default_region!r}")
        self.country_code = str(metadata.country_code)
        mobile = metadata.mobile
        pattern = mobile.national_number_pattern if mobile is not None else None
        self._mobile = re.compile(pattern) if pattern else None
        self._lengths = frozenset(mobile.possible_length or () if mobile is not None else ())
        self._national_prefix = metadata.national_prefix or ""
        self._region_timezone = self._single_timezone()

    def _single_timezone(self) -> str | None:
        """The timezone of every number of the country code, when there is just one (CN)."""
        from phonenumbers.tzdata import TIMEZONE_DATA

        zones = {
            zone
            for prefix, found in TIMEZONE_DATA.items()
            if prefix.startswith(self.country_code)  # country codes are prefix-free
            for zone in found
        }
        zones.discard("Etc/Unknown")
        return zones.pop() if len(zones) == 1 else None

    def fast(self, text: str) -> str | None:
        """E.164 for a default-region mobile in a common shape, else None (no opinion)."""
        if self._mobile is None:
            return None
        compact = text.translate(_SEPARATORS)
        if not _DIGITS.fullmatch(compact):
            return None
        cc = self.country_code
        if compact[0] == "+":
            if not compact.startswith(cc, 1):
                return None
            national = compact[1 + len(cc) :]
        elif compact.startswith("00" + cc):
            national = compact[2 + len(cc) :]
        elif len(compact) in self._lengths:
            national = compact
        elif self._national_prefix and compact.startswith(self._national_prefix):
            national = compact[len(self._national_prefix) :]
        else:
            return None
        if len(national) in self._lengths and self._mobile.fullmatch(national):
            return f"+{cc}{national}"
        return None

    def normalise(self, text: str) -> Phone:
        """The number in E.164 with its region and timezone, or raise InvalidPhone."""
        e164 = self.fast(text)
        if e164 is not None:
            timezone = self._region_timezone or _timezone_of(e164)
            return Phone(e164, self.region, timezone)
        try:
            number = phonenumbers.parse(text, self.region)
        except phonenumbers.NumberParseException as exc:
            raise InvalidPhone(f"not a phone number: {exc._msg}") from None
        if not phonenumbers.is_valid_number(number):
            raise InvalidPhone("not a valid, dialable number for its region")
        e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        return Phone(e164, phonenumbers.region_code_for_number(number), _timezone_of(e164))


def slow_e164(text: str, region: str) -> str | None:
    """phonenumbers alone: the reference the fast path is tested against."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

"""
Presets: how each vendor spells a sticky session into its proxy credentials.

A mapping names a preset (``preset = "oxylabs"``) and may override any part
(``username``, ``password``, ``session_id``, ``params``).  The facts come from
the vendors' public documentation, checked 2026-11 (see README, Presets).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Preset:
    """
    One vendor's conventions.
    """

    name: str
    username: str
    password: str = "{pass}"
    #: Session id characters and default length.
    alphabet: str = "A-Za-z0-9"
    length: int = 8
    #: What ids must look like (regex, checked against the configured spec).
    id_rule: str = r"[A-Za-z0-9]+"
    id_rule_text: str = "letters and digits"
    id_lengths: tuple[int, int] = (1, 64)
    #: Ids that are numbers in a range instead (NetNut).
    number_range: tuple[int, int] | None = None
    #: Allowed session lifetime in seconds, and whether it must be whole minutes.
    lifetime_bounds: tuple[float, float] | None = None
    whole_minutes: bool = False
    #: Mapping-level parameters the templates need, with defaults ("" = required).
    params: tuple[tuple[str, str], ...] = ()
    #: Per-session parameters, with defaults ("" = absent).
    session_params: tuple[tuple[str, str], ...] = (("country", ""),)
    #: The vendor's release API, if it has one (see proxymap.vendors.release).
    release: str | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="geonode",
            username="{user}[-country-{country}]-session-{session}[-lifetime-{lifetime_m}]",
            alphabet="A-Za-z0-9",
            id_rule=r"[A-Za-z0-9_]+",
            id_rule_text="letters, digits and _",
            id_lengths=(1, 25),
            lifetime_bounds=(3 * 60, 1440 * 60),
            whole_minutes=True,
            params=(("service_type", "RESIDENTIAL-PREMIUM"),),
            release="geonode",
        ),
        Preset(
            name="brightdata",
            username="brd-customer-{customer}-zone-{zone}[-country-{country|lower}]"
            "-session-{session}",
            params=(("customer", ""), ("zone", "")),
        ),
        Preset(
            name="oxylabs",
            username="customer-{user}[-cc-{country|upper}]-sessid-{session}"
            "[-sesstime-{lifetime_m}]",
            lifetime_bounds=(60, 1440 * 60),
            whole_minutes=True,
        ),
        Preset(
            name="decodo",
            username="user-{user}[-country-{country|lower}]-session-{session}"
            "-sessionduration-{lifetime_m}",
            lifetime_bounds=(60, 1440 * 60),
            whole_minutes=True,
        ),
        Preset(
            name="iproyal",
            username="{user}",
            password="{pass}[_country-{country|lower}]_session-{session}_lifetime-{lifetime_m}m",
            id_lengths=(8, 8),
            lifetime_bounds=(60, 7 * 1440 * 60),
            whole_minutes=True,
        ),
        Preset(
            name="soax",
            username="package-{package}[-country-{country|lower}]-sessionid-{session}"
            "-sessionlength-{lifetime_s}",
            params=(("package", ""),),
            lifetime_bounds=(1, 7 * 1440 * 60),
        ),
        Preset(
            name="netnut",
            username="{user}-res-{country|lower|default:any}-sid-{session}",
            alphabet="0-9",
            length=9,
            id_rule=r"[0-9]+",
            id_rule_text="digits",
            number_range=(10000, 999999999),
        ),
    )
}

"""Region shortcuts for ``--vastai-geolocation``: a region name expands to the ISO 3166-1
alpha-2 codes of its countries, because Vast.ai filters offers by country code only.

The regions follow the UN M49 geoscheme (the one that defines "Latin America and the
Caribbean"), so every country belongs to exactly one region, with one deliberate exception:
the countries usually counted as European as well as Asian (Armenia, Azerbaijan, Cyprus,
Georgia, Kazakhstan, Russia, Turkey) are in both EU and AS, so neither shortcut surprises.
NA is Northern America (US, CA, BM, GL, PM); Mexico, Central America and the Caribbean are
in LC. Antarctica (AQ) belongs to no region but is still a valid country code.
"""

from __future__ import annotations


def _codes(*subregions: str) -> frozenset[str]:
    """Space-separated codes, one string per UN M49 subregion, as one set."""
    return frozenset(" ".join(subregions).split())


_EUROPE_ASIA = _codes("AM AZ CY GE KZ RU TR")

REGIONS: dict[str, frozenset[str]] = {
    "AF": _codes(
        # Northern, Eastern, Middle, Southern and Western Africa
        "DZ EG EH LY MA SD TN",
        "BI DJ ER ET IO KE KM MG MU MW MZ RE RW SC SO SS TF TZ UG YT ZM ZW",
        "AO CD CF CG CM GA GQ ST TD",
        "BW LS NA SZ ZA",
        "BF BJ CI CV GH GM GN GW LR ML MR NE NG SH SL SN TG",
    ),
    "AS": _EUROPE_ASIA
    | _codes(
        # Central, Eastern, South-eastern, Southern and Western Asia
        "KG TJ TM UZ",
        "CN HK JP KP KR MN MO TW",
        "BN ID KH LA MM MY PH SG TH TL VN",
        "AF BD BT IN IR LK MV NP PK",
        "AE BH IL IQ JO KW LB OM PS QA SA SY YE",
    ),
    "EU": _EUROPE_ASIA
    | _codes(
        # Eastern, Northern, Southern and Western Europe
        "BG BY CZ HU MD PL RO SK UA",
        "AX DK EE FI FO GB GG IE IM IS JE LT LV NO SE SJ",
        "AD AL BA ES GI GR HR IT ME MK MT PT RS SI SM VA",
        "AT BE CH DE FR LI LU MC NL",
    ),
    "LC": _codes(
        # Caribbean, Central America and South America
        "AG AI AW BB BL BQ BS CU CW DM DO GD GP HT JM KN KY LC MF MQ MS PR SX TC TT VC VG VI",
        "BZ CR GT HN MX NI PA SV",
        "AR BO BR BV CL CO EC FK GF GS GY PE PY SR UY VE",
    ),
    "NA": _codes("BM CA GL PM US"),
    "OC": _codes(
        # Australia and New Zealand, Melanesia, Micronesia and Polynesia
        "AU CC CX HM NF NZ",
        "FJ NC PG SB VU",
        "FM GU KI MH MP NR PW UM",
        "AS CK NU PF PN TK TO TV WF WS",
    ),
}

COUNTRIES: frozenset[str] = frozenset({"AQ"}).union(*REGIONS.values())
"""Every ISO 3166-1 alpha-2 country code, to catch typos before they match no offer."""


def expand_geolocation(text: str) -> tuple[str, ...]:
    """Turn ``"EU"``, ``"de, pl"`` or a mix such as ``"NA,DE"`` into sorted, unique country
    codes. A region name wins over the country code it shadows (NA, AS, AF, LC), as in the
    vastai CLI; to mean Namibia and the like, filter with ``geolocation in [NA]`` in the
    search query instead. Raises ValueError saying what is wrong and what is accepted."""
    codes: set[str] = set()
    for given in (part.strip() for part in text.split(",")):
        token = given.upper()
        if token in REGIONS:
            codes |= REGIONS[token]
        elif token in COUNTRIES:
            codes.add(token)
        elif len(token) == 2 and token.isalpha():
            raise ValueError(
                f"{given!r} is not an ISO 3166-1 alpha-2 country code (the United Kingdom is GB)"
            )
        else:
            raise ValueError(
                f"{given!r} is neither a region ({', '.join(REGIONS)}) nor a 2-letter country code"
            )
    return tuple(sorted(codes))

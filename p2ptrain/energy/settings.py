"""Energy and carbon settings of this machine: how it is metered, which grid it draws from.

    p2ptrain config set energy.country FRA               # the grid this machine draws from (ISO 3166, FRA or FR)
    p2ptrain config set energy.intensity_source uk       # live intensity: GB's Carbon Intensity API (no key)
    P2PTRAIN_ELECTRICITYMAPS_TOKEN=… p2ptrain join --model gpt2-small --intensity-source electricitymaps

The ``[energy]`` table of the daemon's config file; ``P2PTRAIN_<FIELD>`` environment variables and the
flags (``--country``, ``--intensity-source``, ``--meter``) win over it, merged in ``settings.resolve_settings``
with the other peer settings. The pause thresholds of carbon-aware mode are idle-policy settings
(``idle.max_grid_g_co2_per_kwh``, ``idle.cleanest_hours``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2ptrain.errors import ConfigError
from p2ptrain.fields import option

INTENSITY_SOURCES = ("country", "uk", "electricitymaps")
_COUNTRY = re.compile(r"^[A-Za-z]{2,3}$")


@dataclass(frozen=True)
class EnergySettings:
    meter: str = option(
        "auto", "energy meter: auto (codecarbon: NVML, RAPL or TDP × load; RAM estimate), none, fake:<file.json>"
    )
    tracking: str = "process"  # process: this peer's processes only (its CPU-time share); machine: the whole machine
    country: str = option("", "ISO 3166 code of this machine's grid, e.g. FRA or FR", shown_default="world average")
    intensity_source: str = option(
        "country", "grid carbon intensity: country (offline average), uk or electricitymaps (needs a token)"
    )
    electricitymaps_token: str = ""  # your Electricity Maps API token (never logged; P2PTRAIN_ELECTRICITYMAPS_TOKEN)
    electricitymaps_zone: str = ""  # Electricity Maps zone, e.g. DE or US-CAL-CISO; "" = the country's 2-letter code
    intensity_url: str = ""  # base URL of the live source; "" = its public address (set it for a proxy or a test)
    intensity_refresh_s: float = 900.0  # fetch the live intensity this often (GB's API changes every 30 min)
    intensity_timeout_s: float = 10.0  # one fetch gives up after this; the country average is used meanwhile
    ledger_every_s: float = 10.0  # read the meter and write the ledger this often (off the training thread)

    def __post_init__(self) -> None:
        checks = [
            (
                self.meter in ("auto", "codecarbon", "none") or self.meter.startswith("fake:"),
                f"meter must be auto, codecarbon, none or fake:<file.json>, got {self.meter!r}",
            ),
            (self.tracking in ("process", "machine"), f"tracking must be process or machine, got {self.tracking!r}"),
            (
                self.country == "" or bool(_COUNTRY.match(self.country)),
                f"country {self.country!r} is not an ISO 3166 code like FRA or FR",
            ),
            (
                self.intensity_source in INTENSITY_SOURCES,
                f"intensity_source must be one of {', '.join(INTENSITY_SOURCES)}, got {self.intensity_source!r}",
            ),
            (
                self.intensity_url == "" or self.intensity_url.startswith(("http://", "https://")),
                f"intensity_url must start with http:// or https://, got {self.intensity_url!r}",
            ),
            (0.1 <= self.intensity_refresh_s <= 86400, "intensity_refresh_s must be in [0.1, 86400]"),
            (0.1 <= self.intensity_timeout_s <= 60, "intensity_timeout_s must be in [0.1, 60]"),
            (0.1 <= self.ledger_every_s <= 3600, "ledger_every_s must be in [0.1, 3600]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"[energy] {message}")

    def to_record(self) -> dict[str, object]:
        """JSON-able, for logs and checkpoints: the token is never written out."""
        record = dict(self.__dict__)
        if record["electricitymaps_token"]:
            record["electricitymaps_token"] = "(set)"
        return record

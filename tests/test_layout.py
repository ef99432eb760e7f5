"""The package's shape, checked: layers import downwards, private names of the libraries stay in the compat
modules, modules stay small (issue 16's bars; ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import hivemind
import pytest
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P

from p2ptrain.compat import hivemind as compat
from p2ptrain.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "p2ptrain"
GENERATED = {"p2pd_pb2.py"}
MAX_LINES = 400
COMPAT = {PACKAGE / "compat", PACKAGE / "p2pd" / "libp2p_patches.py", PACKAGE / "p2pd" / "hole_punching.py"}
# hivemind's classes p2ptrain subclasses or drives: a private name of theirs may appear only in compat/hivemind.py
HIVEMIND_CLASSES = (
    hivemind.Optimizer, hivemind.DHT, P2P, DecentralizedAverager, GradientAverager, PowerSGDGradientAverager,
    TrainingStateAverager, AllReduceRunner, TensorPartContainer, TensorPartReducer, ProgressTracker,
)  # fmt: skip
FOREIGN_PRIVATE = re.compile(r"(?<![\w.])(?!self\b|cls\b)\w+(\(\))?\._[a-zA-Z]\w*")  # x._y, super()._y
STDLIB = re.compile(r"\b(os\._exit|sys\._current_frames)\b")  # documented, underscore and all
HIVEMIND_PRIVATE_MODULES = ("hivemind.p2p.p2p_daemon", "hivemind.compression.serialization")


def sources(under: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if p.name not in GENERATED)


def outside_compat() -> list[Path]:
    return [p for p in sources() if not any(p == c or c in p.parents for c in COMPAT)]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def hivemind_private_names() -> set[str]:
    names: set[str] = set()
    for cls in HIVEMIND_CLASSES:
        for base in cls.__mro__:
            if base.__module__.startswith("hivemind"):
                names |= {n for n in vars(base) if n.startswith("_") and not n.startswith("__")}
                names |= set(re.findall(r"self\.(_[a-zA-Z]\w*)\s*[:=]", inspect.getsource(base)))
    return names


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("train", ("p2ptrain.volunteer", "p2ptrain.energy", "p2ptrain.cli", "p2ptrain.peer")),
        ("swarm", ("p2ptrain.train", "p2ptrain.volunteer", "p2ptrain.energy", "p2ptrain.cli", "p2ptrain.peer")),
        ("energy", ("p2ptrain.train", "p2ptrain.volunteer", "p2ptrain.cli", "p2ptrain.peer")),
        ("compat", ("p2ptrain.train", "p2ptrain.swarm", "p2ptrain.volunteer", "p2ptrain.energy", "p2ptrain.cli")),
        ("p2pd", ("p2ptrain.",)),  # its own process, its own package: it imports nothing of p2ptrain
    ],
)
def test_layers_import_only_downwards(layer, forbidden):
    wrong = {
        f"{p.relative_to(PACKAGE)}: {name}"
        for p in sources(PACKAGE / layer)
        for name in imports(p)
        if name.startswith(forbidden) and not name.startswith("p2ptrain.p2pd")
    }
    assert not wrong


def test_private_names_of_hivemind_and_libp2p_are_touched_only_in_the_compat_modules():
    private = hivemind_private_names()
    assert {"_aggregate_with_group", "_p2p", "_running_groups", "_make_state_averager"} <= private  # the scan works
    wrong = []
    for path in outside_compat():
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            where = f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
            # another object's private attribute (ours or a library's), or a base class's private method
            if FOREIGN_PRIVATE.search(code) and not STDLIB.search(code):
                wrong.append(where)
            # a name hivemind's classes define privately: overriding or reading it belongs in compat/hivemind.py
            elif any(name in private for name in re.findall(r"(?:self\.|def )(_[a-zA-Z]\w*)", code)):
                wrong.append(where)
        wrong += [f"{path.relative_to(PACKAGE)}: imports {m}" for m in imports(path) if m in HIVEMIND_PRIVATE_MODULES]
    assert not wrong, "\n".join(wrong)


def test_the_private_name_scan_catches_what_compat_holds():
    text = (PACKAGE / "compat" / "hivemind.py").read_text()
    assert re.search(r"averager\._running_groups", text)  # the first rule's pattern, on a line it must catch
    assert FOREIGN_PRIVATE.search("x = averager._running_groups")
    assert FOREIGN_PRIVATE.search("super()._aggregate_with_group(g)")
    assert not FOREIGN_PRIVATE.search("self._ours = 1")


def test_an_unsupported_hivemind_is_refused_by_name():
    compat.check_version(compat.SUPPORTED)
    with pytest.raises(ConfigError, match=r"hivemind 1\.2\.0 is installed; p2ptrain supports hivemind 1\.1\.12 only"):
        compat.check_version("1.2.0")


def test_an_unsupported_libp2p_is_refused_by_name():
    import subprocess
    import sys

    code = (
        "from p2ptrain.p2pd import libp2p_patches as p; p.check_version(p.SUPPORTED)\n"
        "try: p.check_version('0.9.0')\nexcept p.UnsupportedVersion as e: print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "py-libp2p 0.9.0 is installed; p2ptrain-p2pd supports py-libp2p 0.8.1 only" in out


def test_both_optimizers_implement_the_whole_peer_optimizer_protocol():
    from p2ptrain.train.local_updates import LocalUpdateOptimizer
    from p2ptrain.train.optimizers import PeerOptimizer, SwarmOptimizer

    wanted = {n for n in vars(PeerOptimizer) if not n.startswith("_")} | set(PeerOptimizer.__annotations__)
    assert {"step", "pause", "shared_params", "load_state_from_peers", "shutdown", "tracker"} <= wanted
    for cls in (SwarmOptimizer, LocalUpdateOptimizer):
        defined = {n for n in wanted if hasattr(cls, n)}
        # instance attributes set in __init__ (hivemind's tracker, local_epoch, the round log) are not on the class
        assert wanted - defined <= {"tracker", "local_epoch", "round_log"}, (cls.__name__, wanted - defined)
        for name in wanted - {"tracker", "local_epoch", "last_group", "on_links"} - (wanted - defined):
            assert getattr(cls, name) is not getattr(PeerOptimizer, name, None), (cls.__name__, name)

"""What the CPU can do, asked in one place, and what --amp auto and --precision auto make of it."""
import builtins
from pathlib import Path

import pytest
import torch

from training import cli
from training.cli import UsageError, check_amp, cpu_capabilities

CPU = torch.device("cpu")


def test_capabilities_agree_with_the_kernels_flags_and_torch():
    found = cpu_capabilities.__wrapped__()
    assert set(found) == {"AVX2", "AVX-512", "VNNI", "bf16", "AMX"}
    capability = torch.backends.cpu.get_cpu_capability()
    assert found["AVX-512"] == (capability == "AVX512") and found["AVX2"] == (capability in ("AVX2", "AVX512"))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the kernel's own flags, read here independently
        flags = cpuinfo.read_text()
        assert found["bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)
        assert found["AMX"] == ("amx_int8" in flags or "amx_tile" in flags)


def test_without_proc_cpuinfo_bf16_comes_from_openvino(monkeypatch):
    """Windows and macOS have no /proc/cpuinfo: bf16 is what OpenVINO's CPU plugin reports, else unknown."""
    real_read_text = Path.read_text

    def no_cpuinfo(self, *a, **k):
        if str(self) == "/proc/cpuinfo":
            raise FileNotFoundError(self)
        return real_read_text(self, *a, **k)
    monkeypatch.setattr(Path, "read_text", no_cpuinfo)
    found = cpu_capabilities.__wrapped__()
    assert found["VNNI"] is None and found["AMX"] is None
    assert found["AVX2"] == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))  # still known
    try:
        import openvino
        assert found["bf16"] == ("BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except ImportError:
        assert found["bf16"] is None
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "openvino" else real_import(name, *a, **k))
    assert cpu_capabilities.__wrapped__()["bf16"] is None  # neither source: unknown, never "no"


@pytest.mark.parametrize("bf16,expected", [(True, "bf16"), (False, "off"), (None, "off")])
def test_amp_auto_trains_in_bf16_exactly_where_the_cpu_has_it(monkeypatch, bf16, expected):
    monkeypatch.setattr(cli, "cpu_capabilities", lambda: {"AVX2": True, "AVX-512": True, "VNNI": True,
                                                           "bf16": bf16, "AMX": False})
    assert cli.resolve_amp("auto", CPU) == expected
    assert cli.resolve_amp("off", CPU) == "off" and cli.resolve_amp("bf16", CPU) == "bf16"


def test_amp_bf16_is_refused_only_where_the_cpu_is_known_to_lack_it(monkeypatch):
    for bf16 in (True, None):  # None: another OS without OpenVINO; the user's explicit ask is honoured
        monkeypatch.setattr(cli, "cpu_capabilities", lambda: {"bf16": bf16})
        check_amp("bf16", CPU)
    monkeypatch.setattr(cli, "cpu_capabilities", lambda: {"bf16": False})
    with pytest.raises(UsageError, match="--amp bf16: this CPU has no bf16 instructions"):
        check_amp("bf16", CPU)


def test_precision_auto_tries_bf16_where_the_capability_says_so():
    from deploy.precision_choice import candidates, describe_cpu
    has = {"AVX2": True, "AVX-512": True, "VNNI": None, "bf16": True, "AMX": None}
    assert candidates("openvino", has) == ["int8", "int8 more float", "int8 fine-tuned", "bf16", "fp32"]
    assert candidates("onnx", has) == ["int8", "int8 more float", "int8 fine-tuned", "fp32"]
    assert candidates("openvino", has | {"bf16": False}) == ["int8", "int8 more float", "int8 fine-tuned", "fp32"]
    assert "VNNI unknown" in describe_cpu(has) and "bf16 is native" in describe_cpu(has)

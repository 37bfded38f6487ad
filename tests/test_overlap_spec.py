"""The overlap options at the boundary: validation names the field and the fix, `loom run` / `loom verify`
refuse them (the executor does not implement them) while `loom simulate` accepts them, and the exports map them to
Megatron-LM's --tp-comm-overlap / --overlap-param-gather and torchtitan's async TP, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from loom.cli import main
from loom.spec import SpecError
from loom.spec.export import MEGATRON_FLAGS, TORCHTITAN_KEYS, export_megatron, export_torchtitan, parse_megatron_args
from loom.spec.export_megatron import overlaps_from_megatron
from loom.spec.export_torchtitan import overlaps_from_torchtitan, parse_torchtitan
from loom.spec.load import spec_from_dict

SPEC = """
[model]
preset = "llama3-8b"
[cluster]
gpu = "{gpu}"
gpus_per_node = 4
nodes = 1
[training]
global_batch = 8
micro_batch = 1
[parallel]
dp = 2
tp = 2
sp = true
zero = 1
{extra}
"""


def _d(**par) -> dict:
    return {"model": {"preset": "llama3-8b"}, "cluster": {"gpu": "H100-SXM", "gpus_per_node": 4, "nodes": 1},
            "training": {"global_batch": 8, "micro_batch": 1},
            "parallel": {"dp": 2, "tp": 2, "sp": True, "zero": 1} | par}


@pytest.mark.parametrize("par, field, fix", [
    ({"tp_comm_overlap": True, "sp": False}, "parallel.tp_comm_overlap", "sp = true"),
    ({"tp_comm_overlap": True, "tp": 1, "dp": 4, "sp": False}, "parallel.tp_comm_overlap", "tp > 1"),
    ({"overlap_param_gather": True, "zero": 0}, "parallel.overlap_param_gather", "zero = 1"),
    ({"overlap_param_gather": True, "dp": 1, "tp": 4}, "parallel.overlap_param_gather", "dp > 1"),
])
def test_invalid_overlaps_name_field_and_fix(par, field, fix):
    with pytest.raises(SpecError) as exc:
        spec_from_dict(_d(**par))
    issue = next(i for i in exc.value.issues if i.field == field)
    assert fix in issue.fix


def test_valid_overlaps_load():
    p = spec_from_dict(_d(tp_comm_overlap=True, overlap_param_gather=True)).plan
    assert p.tp_comm_overlap and p.overlap_param_gather


@pytest.mark.parametrize("extra, field", [("tp_comm_overlap = true", "tp_comm_overlap"),
                                          ("overlap_param_gather = true", "overlap_param_gather")])
@pytest.mark.parametrize("command", ["run", "verify"])
def test_run_and_verify_refuse_what_the_executor_does_not_implement(tmp_path: Path, capsys, command, extra, field):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(gpu="cpu", extra=extra).replace("[training]", "[training]\nprecision = \"fp32\""))
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"parallel.{field}" in err and f"parallel.{field} = false" in err and "Traceback" not in err


def test_simulate_accepts_the_overlaps(tmp_path: Path, capsys):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(gpu="H100-SXM", extra="tp_comm_overlap = true\noverlap_param_gather = true"))
    assert main(["simulate", str(path)]) == 0


@pytest.mark.parametrize("tpo, opg", [(False, False), (True, False), (False, True), (True, True)])
def test_megatron_export_round_trip(tpo, opg):
    spec = spec_from_dict(_d(tp_comm_overlap=tpo, overlap_param_gather=opg))
    out = export_megatron(spec)
    args = parse_megatron_args(out)
    assert overlaps_from_megatron(args) == {"tp_comm_overlap": tpo, "overlap_param_gather": opg}
    flags = {"--" + k.replace("_", "-") for k in args}
    assert flags <= MEGATRON_FLAGS
    # what Megatron-LM asserts alongside (arguments.py): SP with TP overlap; the distributed optimizer and
    # --overlap-grad-reduce with the parameter-gather overlap
    if tpo:
        assert args.get("sequence_parallel") is True
    if opg:
        assert args.get("use_distributed_optimizer") is True and args.get("overlap_grad_reduce") is True


@pytest.mark.parametrize("tpo", [False, True])
def test_torchtitan_export_round_trip(tpo):
    spec = spec_from_dict(_d(tp_comm_overlap=tpo, overlap_param_gather=True))
    out = export_torchtitan(spec)
    tables, _ = parse_torchtitan(out)
    for section, values in tables.items():
        assert set(values) <= TORCHTITAN_KEYS[section], section
    assert tables["parallelism"]["enable_async_tensor_parallel"] is tpo
    # torchtitan refuses async TP without compiling the model (distributed/tensor_parallel.py)
    assert ("compile" in tables and tables["compile"]["enable"] and "model" in tables["compile"]["components"]) \
        == tpo
    assert overlaps_from_torchtitan(out)["tp_comm_overlap"] is tpo


def test_run_names_the_overlap_before_machine_checks(tmp_path: Path, capsys):
    """A multi-node spec (which would otherwise stop at the missing rendezvous endpoint) is refused for the
    overlap first: it is a property of the spec, not of the machine."""
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(gpu="H100-SXM", extra="tp_comm_overlap = true")
                    .replace("gpus_per_node = 4\nnodes = 1", "gpus_per_node = 2\nnodes = 2"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp_comm_overlap" in err and "LOOM_RDZV_ENDPOINT" not in err

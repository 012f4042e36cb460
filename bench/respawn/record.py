"""The record of the respawn section: its targets, tables, plots and reading."""

from __future__ import annotations

from bench import common

TARGET_S = 1.0  # kill -> ready, seconds


def targets(res: dict) -> list[tuple[str, str, bool]]:
    z = res["summary"]["zygote"]
    return [
        (
            f"tiny model on CPU: SIGKILL to ready again, median of >= 5 kills, under {TARGET_S:g} s",
            f"{z['kill_to_ready']:.2f} s (median of {z['n']})",
            z["kill_to_ready"] < TARGET_S and z["n"] >= 5,
        )
    ]


def render(res: dict) -> str:
    s = res["summary"]
    z, sp = s["zygote"], s["spawn"]
    rz, rs = res["zygote"], res["spawn"]

    def sec(x):
        return "n/a" if x is None else f"{x:.3f}"

    rows = [
        [
            "**SIGKILL -> ready with a new pid** (median)",
            sec(z["kill_to_ready"]),
            sec(sp["kill_to_ready"]),
        ],
        ["worst of the kills", sec(z["max_kill_to_ready"]), sec(sp["max_kill_to_ready"])],
        ["detect (SIGKILL -> `dead`)", sec(z["detect"]), sec(sp["detect"])],
        ["backoff (`dead` -> `starting`)", sec(z["wait"]), sec(sp["wait"])],
        ["fork / spawn (process start)", sec(z["fork"]), sec(sp["fork"])],
        [
            "child start (up to load; a spawned child imports here)",
            sec(z["child"]),
            sec(sp["child"]),
        ],
        [
            "engine load (weights mapped, model built; spawned: with its imports)",
            sec(z["load"]),
            sec(sp["load"]),
        ],
        [
            "of which: mapping the weights (safetensors, in a new child)",
            sec(rz.get("map_s")),
            sec(rs.get("map_s")),
        ],
        [
            "first step: first request minus second on the new worker",
            sec(z["first_step"]),
            sec(sp["first_step"]),
        ],
        ["imports (and tables) paid once by the zygote, at launch", sec(rz.get("import_s")), "-"],
        ["launch, both workers ready", sec(rz["launch_s"]), sec(rs["launch_s"])],
    ]
    return "\n".join(
        [
            f"The tiny model on 2 CPU workers; {z['n']} SIGKILLs of an idle worker (the two in "
            f"turn, each once it has been ready 10 s, so every respawn is a first death) with "
            f"`worker_start = zygote`, {sp['n']} with `worker_start = spawn`, one pool after the "
            f"other. Seconds:",
            "",
            common.table(["", "zygote", "spawn"], rows),
        ]
    )


def reading(res: dict) -> list[str]:
    s = res["summary"]
    z, sp = s["zygote"], s["spawn"]
    imports = res["zygote"].get("import_s")
    return [
        "### Reading the figures",
        "",
        f"- A forked worker pays its engine load and little else: detection "
        f"{z['detect'] * 1e3:.0f} ms, no backoff on a first death, the fork "
        f"{z['fork'] * 1e3:.0f} ms, the child's start {z['child'] * 1e3:.0f} ms, the load "
        f"{z['load']:.2f} s (the weights mapped from the parent's memory files, the model "
        f"built). The imports ({_or_na(imports)} s of the zygote's, once, at launch) are what "
        f"a spawned worker pays again at every respawn: its load, {sp['load']:.2f} s here, "
        "includes them.",
        f"- Kill to ready: {z['kill_to_ready']:.2f} s with the zygote against "
        f"{sp['kill_to_ready']:.2f} s spawned, {sp['kill_to_ready'] / z['kill_to_ready']:.0f}x, "
        "measured one pool after the other on the same machine. On 2 shared cores the load "
        "time moves with the machine's other work (see the load average above); the ratio "
        "moves less.",
        f"- The first request on a new worker is {z['first_step'] * 1e3:+.0f} ms against its "
        "second (zygote): the zygote has imported what the first generate would import, "
        "so the first step costs what any step costs.",
        f"- Launch: the zygote imports once, in one process, and the first workers wait "
        f"for it; spawned workers import in parallel, one per core. With as many workers as "
        f"cores the two launch about alike, and launch time follows the machine's other "
        f"load most of all: here {res['zygote']['launch_s']:.1f} s against "
        f"{res['spawn']['launch_s']:.1f} s, one after the other. With more workers than "
        "cores, or on a GPU server whose workers each import on a busy core, the zygote "
        "imports once instead of N times.",
        "- On a GPU a respawn adds CUDA init and the weight copy from host memory: "
        "`bench/gpu_respawn.py` measures both, and checks with nvidia-smi that only workers "
        "hold GPU memory; it runs where a GPU is lent.",
    ]


def _or_na(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


# ---- in the record (bench/report.py assembles the sections) ---------------


def target_rows(d: dict) -> list[list[str]]:
    """This section's rows of the record's targets table."""
    return [[what, got, common.verdict(ok)] for what, got, ok in targets(d)]


def section(sec, img_dir=None, rel="") -> list[str]:
    out = ["## 3b. Respawn: a killed worker serving again", ""]
    if sec is None:
        return out + ["`python -m bench.respawn.run` was not run in this run.", ""]
    if "data" not in sec:
        return out + common.failed("respawn", sec)
    return out + [render(sec["data"]), "", *reading(sec["data"]), ""]

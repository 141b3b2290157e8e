"""Training against the reference: loss == HF's causal-LM loss, AdamW steps == torch.optim.AdamW, resume ==
uninterrupted, the reference's run YAML, data parallel over 2 msrun processes == one process, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CODE_ALPACA_SAMPLE, zoo

from registry_spec.errors import InputError
from registry_spec.specs import TrainSpec
from wizardcoder_plugin.model.config import load_config
from wizardcoder_plugin.training.optim import LossScaler, cosine_with_warmup
from wizardcoder_plugin.training.preprocess import write_mindrecord
from wizardcoder_plugin.training.run_config import TrainSettings, resolve_train
from wizardcoder_plugin.training.trainer import Trainer, checkpoints

PAD = 49152
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # HF's config defaults to 0.1
pytestmark = pytest.mark.slow


def make_rows(n: int, width: int, seed: int = 0, prompt: int = 5, pad_tail: bool = True):
    """Finetune-like rows: -100 on a prompt prefix, a [PAD] tail on every other row."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = rng.integers(1, 49000, size=width).astype(np.int32)
        labels = ids.copy()
        labels[:prompt] = -100
        if pad_tail and i % 2:
            ids[width - 4:] = PAD
            labels[width - 4:] = -100
        rows.append((ids, labels))
    return rows


def mindrecord(path: Path, rows) -> Path:
    write_mindrecord(path, iter(rows), progress=False)
    return path


def ms_weights(ckpt: Path) -> dict[str, np.ndarray]:
    from wizardcoder_plugin.weights.sources import raw_tensors

    return {k: t.read() for k, t in raw_tensors(ckpt)}


def torch_reference(hf_dir: Path, rows, steps: int, batch: int, lr: float, wd: float, clip: float,
                    betas=(0.9, 0.999), accum: int = 1, eps: float = 1e-8):
    """HF model + torch AdamW (no decay on biases/LayerNorm) on the same rows in the same order."""
    import torch
    from transformers import GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM.from_pretrained(hf_dir, **NO_DROPOUT).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps)
    losses, k = [], 0
    for _ in range(steps):
        step_loss = 0.0
        for _ in range(accum):
            ids = torch.tensor(np.stack([r[0] for r in rows[k:k + batch]]), dtype=torch.long)
            labels = torch.tensor(np.stack([r[1] for r in rows[k:k + batch]]), dtype=torch.long)
            k += batch
            # whole rows: HF shifts internally, so logits 0..S-1 predict labels 1..S, as ours do
            out = model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels)
            (out.loss / accum).backward()
            step_loss += out.loss.item() / accum
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(step_loss)
    return losses, {n: p.detach().numpy() for n, p in model.state_dict().items()}


def train(settings: TrainSettings, hf_dir: Path, callbacks=None):
    config = load_config(hf_dir / "config.json").model_copy(update=NO_DROPOUT)
    return Trainer(settings, config, "custom", PAD, progress=False).train(callbacks)


def test_loss_equals_hf_causal_lm_loss(hf_tiny, hf_model):
    import torch
    from mindspore import Tensor

    from wizardcoder_plugin.model.runtime import build_model
    from wizardcoder_plugin.training.optim import CausalLMLoss

    rows = make_rows(3, 33, seed=3)
    ids = np.stack([r[0] for r in rows])
    labels = np.stack([r[1] for r in rows])
    loss_net = CausalLMLoss(build_model("custom", load_config(hf_tiny), hf_tiny), PAD)
    ours = float(loss_net(Tensor(ids), Tensor(labels)).asnumpy())
    t_ids = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        ref = hf_model(input_ids=t_ids, attention_mask=(t_ids != PAD).long(),
                       labels=torch.tensor(labels, dtype=torch.long)).loss.item()
    assert abs(ours - ref) < 1e-5
    # a batch with no labelled token gives 0, not NaN
    none = float(loss_net(Tensor(ids), Tensor(np.full_like(labels, -100))).asnumpy())
    assert none == 0.0


@pytest.mark.parametrize(("steps", "tol"), [(1, 1e-5), (3, 5e-5)])
def test_adamw_steps_equal_torch(tmp_path, hf_tiny, steps, tol):
    """With clipping active, 2 accumulated micro-batches per step and decay on matrices only. Over several steps
    Adam's m/sqrt(v) turns fp32 rounding noise on zero gradients (the key bias's gradient is exactly 0 in exact
    arithmetic: softmax ignores a per-query constant) into +-lr steps of either sign, so eps = 1e-6 (both sides)
    keeps such noise near 1e-5 (1.02e-5 seen on a 2-vCPU EPYC: the key bias gets 5x the tolerance, every other
    tensor the stated one); the multi-step tolerance is looser for the same reason."""
    rows = make_rows(12, 17, seed=1)
    data = mindrecord(tmp_path / "d.mindrecord", rows)
    lr, wd, clip = 3e-3, 0.1, 0.5
    s = TrainSettings(data=data, mode="finetune", output_dir=tmp_path / "out", weights=hf_tiny, max_steps=steps,
                      batch_size=2, grad_accum=2, learning_rate=lr, lr_end=lr, weight_decay=wd, grad_clip=clip,
                      beta2=0.95, eps=1e-6)
    train(s, hf_tiny)
    ref_losses, ref = torch_reference(hf_tiny, rows, steps, 2, lr, wd, clip, betas=(0.9, 0.95), accum=2, eps=1e-6)
    metrics = [json.loads(x) for x in (s.output_dir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([m["loss"] for m in metrics], ref_losses, atol=1e-5)
    assert metrics[0]["grad_norm"] > clip  # clipping was active
    ours = ms_weights(s.output_dir / f"checkpoint-{steps}" / "model.safetensors")
    changed = 0
    for name, value in ref.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        diff = np.abs(ours[name] - value)
        if name.endswith("attn.c_attn.bias"):  # the key bias: zero gradient, Adam-amplified noise (docstring)
            key = slice(CFG_EMBD, CFG_EMBD + CFG_HEAD_DIM)
            assert diff[key].max() < 5 * tol, name
            diff[key] = 0
        assert diff.max() < tol, name
        changed += int(np.abs(value - ref_initial(hf_tiny)[name]).max() > 1e-4)
    assert changed > 10  # the steps really moved the weights


CFG_EMBD, CFG_HEAD_DIM = 64, 16  # hf_tiny: 64 wide, 4 heads, multi-query (one 16-wide key head)
_INITIAL: dict = {}


def ref_initial(hf_dir: Path) -> dict:
    if not _INITIAL:
        from safetensors.numpy import load_file

        _INITIAL.update(load_file(hf_dir / "model.safetensors"))
    return _INITIAL


def test_resume_equals_uninterrupted_and_survives_a_killed_save(tmp_path, hf_tiny):
    rows = make_rows(10, 17, seed=2)
    data = mindrecord(tmp_path / "d.mindrecord", rows)
    common = dict(data=data, mode="finetune", weights=hf_tiny, max_steps=6, batch_size=2, learning_rate=1e-3,
                  warmup_steps=2, weight_decay=0.01, save_steps=2, keep_checkpoints=2)
    full = train(TrainSettings(output_dir=tmp_path / "full", **common), hf_tiny)
    assert full.steps == 6
    assert [p.name for p in checkpoints(tmp_path / "full")] == ["checkpoint-4", "checkpoint-6"]  # keeps the last 2

    def interrupt(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainSettings(output_dir=tmp_path / "part", **common), hf_tiny, [interrupt])
    assert [p.name for p in checkpoints(tmp_path / "part")] == ["checkpoint-2", "checkpoint-3"]
    # a save killed half-way (SIGKILL) leaves only a temporary folder: ignored and cleaned on resume
    stale = tmp_path / "part" / ".checkpoint-4.abc.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    resumed = train(TrainSettings(output_dir=tmp_path / "part", resume=True, **common), hf_tiny)
    assert resumed.steps == 6 and not stale.exists()
    a, b = ms_weights(full.checkpoint), ms_weights(resumed.checkpoint)
    assert all(np.abs(a[k] - b[k]).max() < 1e-6 for k in a)
    full_m = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part_m = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in part_m] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([json.loads(x)["loss"] for x in part_m], [json.loads(x)["loss"] for x in full_m],
                               atol=1e-6)
    # resuming a finished run trains nothing and reports the last recorded step
    again = train(TrainSettings(output_dir=tmp_path / "full", resume=True, **common), hf_tiny)
    assert again.steps == 6 and again.tokens_per_s > 0
    assert again.final_loss == json.loads(full_m[-1])["loss"]
    # resuming with a different batch layout is refused, not silently misaligned
    with pytest.raises(InputError, match="batch_size was 2"):
        train(TrainSettings(output_dir=tmp_path / "part", resume=True, **(common | {"batch_size": 1})), hf_tiny)


def test_an_interrupt_while_the_first_step_compiles_waits_for_the_step_and_saves_it(tmp_path, hf_tiny, capsys):
    """Ctrl-C inside MindSpore's first compile would fail the compile with pages of trace; it lands after the
    step instead, which is saved like any interrupted step (SIGINT from inside the first accumulate call)."""
    import os
    import signal

    s = TrainSettings(data=mindrecord(tmp_path / "d.mindrecord", make_rows(8, 17, seed=3)), mode="finetune",
                      weights=hf_tiny, max_steps=4, batch_size=2, output_dir=tmp_path / "run")
    config = load_config(hf_tiny / "config.json").model_copy(update=NO_DROPOUT)
    trainer = Trainer(s, config, "custom", PAD, progress=False)
    accumulate, calls = trainer.accumulate, []

    def interrupted_inside(*args):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(1)
        return accumulate(*args)

    trainer.accumulate = interrupted_inside
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert calls == [1] and "SIGINT: stopping after the first step compiles" in capsys.readouterr().err
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_an_interrupt_during_the_final_save_waits_for_the_checkpoint(tmp_path, hf_tiny, capsys, monkeypatch):
    """The run's last checkpoint is written whole, then the interrupt takes effect (SIGINT from inside the write)."""
    import os
    import signal

    from wizardcoder_plugin.training import trainer as trainer_module

    s = TrainSettings(data=mindrecord(tmp_path / "d.mindrecord", make_rows(4, 17, seed=3)), mode="finetune",
                      weights=hf_tiny, max_steps=2, batch_size=2, output_dir=tmp_path / "run")
    config = load_config(hf_tiny / "config.json").model_copy(update=NO_DROPOUT)
    trainer = Trainer(s, config, "custom", PAD, progress=False)
    save_params, writes = trainer_module.save_params, []

    def interrupted_inside(params, path, **kw):
        if not writes:
            os.kill(os.getpid(), signal.SIGINT)
        writes.append(path.name)
        return save_params(params, path, **kw)

    monkeypatch.setattr(trainer_module, "save_params", interrupted_inside)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert writes == ["model.safetensors", "optimizer.safetensors"]
    assert "SIGINT: stopping after the final checkpoint is written" in capsys.readouterr().err
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    assert ms_weights(tmp_path / "run" / "checkpoint-2" / "model.safetensors")


def test_resumed_pretraining_starts_from_its_checkpoint_not_a_random_init(tmp_path, hf_tiny, capsys):
    """A from-scratch run resumed: the model is built from the checkpoint (no random init only to be overwritten,
    30 s at 1B) and the run ends where an uninterrupted one does."""
    data = mindrecord(tmp_path / "d.mindrecord", make_rows(8, 17, seed=5))
    common = dict(data=data, mode="pretrain", max_steps=4, batch_size=2, learning_rate=1e-3, save_steps=2, seed=3)
    full = train(TrainSettings(output_dir=tmp_path / "full", **common), hf_tiny)
    assert "random init" in capsys.readouterr().err

    def interrupt(row):
        if row["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainSettings(output_dir=tmp_path / "part", **common), hf_tiny, [interrupt])
    capsys.readouterr()
    resumed = train(TrainSettings(output_dir=tmp_path / "part", resume=True, **common), hf_tiny)
    err = capsys.readouterr().err
    assert "resuming from" in err and "random init" not in err, err
    a, b = ms_weights(full.checkpoint), ms_weights(resumed.checkpoint)
    assert a.keys() == b.keys() and all(np.abs(a[k] - b[k]).max() < 1e-6 for k in a)


def test_recompute_gives_the_same_steps(tmp_path, hf_tiny, capsys):
    """...and, on the CPU, a note that it costs memory there instead of saving it."""
    from registry_spec.specs import ParallelSpec

    data = mindrecord(tmp_path / "d.mindrecord", make_rows(4, 17, seed=6))
    losses, notes = [], []
    for recompute in (False, True):
        s = TrainSettings(data=data, mode="finetune", output_dir=tmp_path / f"r{recompute}", weights=hf_tiny,
                          max_steps=2, batch_size=2, learning_rate=1e-3, parallel=ParallelSpec(recompute=recompute))
        train(s, hf_tiny)
        losses.append([json.loads(x)["loss"] for x in (s.output_dir / "metrics.jsonl").read_text().splitlines()])
        notes.append("recompute raises zoo train's peak memory" in capsys.readouterr().err)
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-6)
    assert notes == [False, True]


def test_sigkill_during_training_leaves_a_resumable_checkpoint(tmp_path, hf_tiny):
    import signal
    import time

    data = mindrecord(tmp_path / "d.mindrecord", make_rows(64, 17, seed=7))
    args = ["train", "wizardcoder-tiny", "--config", str(hf_tiny / "config.json"), "--weights", str(hf_tiny),
            "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "30", "--batch-size", "2",
            "--save-steps", "1", "--keep-checkpoints", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "registry_spec.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not len(checkpoints(tmp_path / "run")) >= 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of later steps and saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints(tmp_path / "run"), "no checkpoint before the kill"
    r = zoo(*args, "--resume", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 30
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # the torn save was cleaned up


def test_sigterm_saves_a_checkpoint_at_the_step_reached_and_resume_finishes(tmp_path, hf_tiny):
    """A scheduler's stop (SIGTERM, as Slurm or Kubernetes send before SIGKILL) is Ctrl-C: the step reached is
    saved, the exit status is 128 + 15, and --resume ends where an uninterrupted run does."""
    import signal
    import time

    data = mindrecord(tmp_path / "d.mindrecord", make_rows(64, 17, seed=7))
    args = ["train", "wizardcoder-tiny", "--config", str(hf_tiny / "config.json"), "--weights", str(hf_tiny),
            "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "400", "--batch-size", "2",
            "--save-steps", "1000"]
    proc = subprocess.Popen([sys.executable, "-m", "registry_spec.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "terminated" in err, err
    steps = len(metrics.read_text().splitlines())
    assert [p.name for p in checkpoints(tmp_path / "run")] == [f"checkpoint-{steps}"], err
    r = zoo(*[a if a != "400" else str(steps + 2) for a in args], "--resume", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == steps + 2, r.stderr


def test_fp16_trains_with_dynamic_loss_scale(tmp_path, hf_tiny):
    data = mindrecord(tmp_path / "d.mindrecord", make_rows(8, 17, seed=4))
    s = TrainSettings(data=data, mode="finetune", output_dir=tmp_path / "o", weights=hf_tiny, max_steps=4,
                      batch_size=2, learning_rate=1e-3, precision="fp16")
    res = train(s, hf_tiny)
    metrics = [json.loads(x) for x in (s.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss_scale"] == 2048.0
    assert all(np.isfinite(m["loss"]) for m in metrics) and np.isfinite(res.final_loss)
    ours = ms_weights(res.checkpoint)
    assert ours["transformer.h.0.attn.c_attn.weight"].dtype == np.float16


def test_loss_scaler_and_schedule_follow_the_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # importing mindformers writes ./output/log
    sc = LossScaler(scale=2048, factor=2, window=3, dynamic=True)
    sc.update(False)
    assert sc.scale == 1024
    for _ in range(3):
        sc.update(True)
    assert sc.scale == 2048
    from mindformers.core.lr import CosineWithWarmUpLR
    from mindspore import Tensor

    ref = CosineWithWarmUpLR(learning_rate=2e-5, lr_end=5e-7, warmup_steps=8, total_steps=40)
    for step in (0, 1, 7, 8, 9, 20, 39, 40, 45):
        want = float(ref(Tensor(step)).asnumpy())
        assert abs(cosine_with_warmup(step, 2e-5, 5e-7, 8, 40) - want) < 1e-11, step


def test_reference_run_yaml_is_mapped_and_leftovers_reported(tmp_path):
    yaml_text = (Path(__file__).parent / "fixtures" / "finetune_wizardcoder_tiny.yaml").read_text()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text.replace("DATASET_DIR", str(tmp_path / "train.mindrecord")))
    spec = TrainSpec(model="wizardcoder-tiny", config=cfg, output_dir=tmp_path / "o", learning_rate=1e-4)
    s, config, notes = resolve_train(spec, "wizardcoder-tiny")
    assert s.learning_rate == 1e-4  # the flag wins over the YAML's 2e-6
    assert (s.lr_end, s.warmup_steps, s.batch_size, s.epochs) == (5e-7, 80, 1, 1)
    assert s.bias_correction is False  # FP32StateAdamWeightDecay
    assert (s.loss_scale, s.loss_scale_factor, s.loss_scale_window) == (2048, 2, 1000)
    assert s.data == tmp_path / "train.mindrecord" and s.mode == "finetune"
    assert (s.parallel.model_parallel, s.parallel.pipeline_stage, s.parallel.micro_batch_num) == (4, 2, 8)
    assert (s.save_steps, s.keep_checkpoints) == (10000, 2)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_inner) == (64, 2, 4, 256)
    joined = "\n".join(notes)
    for key in ("context", "moe_config", "profile", "metric", "processor", "runner_config.sink_mode",
                "parallel_config.vocab_emb_dp", "mystery_key: unsupported key"):
        assert key in joined, key


def test_data_parallel_over_two_msrun_processes_equals_one_process(tmp_path, hf_tiny):
    """Packed (pretrain) rows have equal token counts per rank, so the mean of rank losses is the global loss."""
    rows = make_rows(8, 17, seed=5, prompt=0, pad_tail=False)
    data = mindrecord(tmp_path / "d.mindrecord", rows)
    spec = tmp_path / "dp.json"
    spec.write_text(json.dumps({"parallel": {"data_parallel": 2}}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(json.loads((hf_tiny / "config.json").read_text()) | NO_DROPOUT))

    def args(batch: int) -> list[str]:
        return ["train", "wizardcoder-tiny", "--config", str(config), "--data", str(data),
                "--mode", "finetune", "--weights", str(hf_tiny), "--max-steps", "3", "--batch-size", str(batch),
                "--learning-rate", "1e-3", "--weight-decay", "0.1"]

    bindir = str(Path(sys.executable).parent)
    cache = tmp_path / "kernel-cache"  # empty: the first run's ranks time their backward choices
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "ZOO_KERNEL_CACHE": str(cache)}
    msrun = shutil.which("msrun", path=env["PATH"])
    zoo_bin = shutil.which("zoo", path=env["PATH"])
    for out in ("dp", "dp-again"):  # the same 2-rank run twice: identical to the bit
        r = subprocess.run([msrun, "--worker_num=2", "--local_worker_num=2", "--master_port=8231", "--join=True",
                            f"--log_dir={tmp_path / 'logs' / out}", zoo_bin, *args(1), "--output-dir",
                            str(tmp_path / out), "--spec", str(spec)], capture_output=True, text=True, env=env,
                           timeout=600, cwd=tmp_path)
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (tmp_path / "logs" / out).glob("*.log"))
        assert r.returncode == 0, logs
    again = ms_weights(tmp_path / "dp-again" / "checkpoint-3" / "model.safetensors")
    first = ms_weights(tmp_path / "dp" / "checkpoint-3" / "model.safetensors")
    assert [k for k in first if first[k].tobytes() != again[k].tobytes()] == []
    one = zoo(*args(2), "--output-dir", str(tmp_path / "single"), env={"ZOO_KERNEL_CACHE": str(cache)})
    assert one.returncode == 0, one.stderr
    dp_m = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    one_m = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([m["loss"] for m in dp_m], [m["loss"] for m in one_m], atol=1e-5)
    a = ms_weights(tmp_path / "dp" / "checkpoint-3" / "model.safetensors")
    b = ms_weights(tmp_path / "single" / "checkpoint-3" / "model.safetensors")
    for k in a:  # the key bias has an exactly-zero true gradient: Adam turns its rounding noise into +-lr steps
        if k.endswith("attn.c_attn.bias"):
            a[k][64:80] = b[k][64:80] = 0.0
    diffs = {k: float(np.abs(a[k] - b[k]).max()) for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


def test_cli_finetune_tiny_on_code_alpaca_lowers_the_loss(tmp_path):
    rows = json.loads(CODE_ALPACA_SAMPLE.read_text())[:400]
    src = tmp_path / "ca.json"
    src.write_text(json.dumps(rows))
    data = tmp_path / "ca.mindrecord"
    assert zoo("preprocess", "wizardcoder-tiny", "--input", str(src), "--output", str(data), "--seq-length",
               "128").returncode == 0
    r = zoo("train", "wizardcoder-tiny", "--data", str(data), "--mode", "finetune", "--output-dir",
            str(tmp_path / "ft"), "--max-steps", "30", "--batch-size", "8", "--learning-rate", "1e-3",
            "--warmup-steps", "3", "--save-steps", "10", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    losses = [json.loads(x)["loss"] for x in Path(res["metrics_file"]).read_text().splitlines()]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 2.0, losses
    # the trained checkpoint folder loads for prediction
    p = zoo("predict", "wizardcoder-tiny", "--weights", str(Path(res["checkpoint"]).parent), "--prompt",
            "Write a function.", "--max-new-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    bad = zoo("train", "wizardcoder-tiny", "--data", str(tmp_path / "nope.mindrecord"), "--output-dir",
              str(tmp_path / "x"))
    assert bad.returncode != 0 and "zoo preprocess" in bad.stderr
    # a fresh run into this run's folder would mix their checkpoints: refused, nothing of the first run touched
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ft").rglob("*")}
    again = zoo("train", "wizardcoder-tiny", "--data", str(data), "--mode", "finetune", "--output-dir",
                str(tmp_path / "ft"), "--max-steps", "2")
    assert again.returncode == 2 and "checkpoint-30" in again.stderr and "--resume" in again.stderr, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ft").rglob("*")} == before


def test_other_backwards_give_the_same_gradients(hf_tiny):
    """The trainer's faster backwards for linear layers: chunked dx, dW, db equal torch's for an uneven split; the
    whole model's gradients are unchanged with every layer chunked (identical) or on the native backward (fp32
    rounding); the shape probe marks only what it picked."""
    import mindspore as ms
    import torch
    from mindspore import Parameter, ParameterTuple, Tensor

    from wizardcoder_plugin.kernels import availability, native_kernels
    from wizardcoder_plugin.kernels.cells import NativeBackwardDense
    from wizardcoder_plugin.kernels.choices import choose_backwards
    from wizardcoder_plugin.model.modeling import ChunkedBackwardDense, Dense, DenseGrad, Linear
    from wizardcoder_plugin.model.runtime import build_model
    from wizardcoder_plugin.training.optim import AccumulateGrads, CausalLMLoss

    rng = np.random.default_rng(5)
    x, w, b, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((6, 100), (7, 100), (7,), (6, 7)))
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    torch.nn.functional.linear(tx, tw, tb).backward(torch.tensor(dy))
    for dense in (Dense(), ChunkedBackwardDense(3)):
        got = DenseGrad(dense)(*(Tensor(a) for a in (x, w, b, dy)))
        for ours, ref in zip(got, (tx.grad, tw.grad, tb.grad), strict=True):
            np.testing.assert_allclose(ours.asnumpy(), ref.numpy(), rtol=1e-5, atol=1e-5)

    native = native_kernels() if availability()[0] else None

    def grads(kind: str) -> list:
        net = build_model("custom", load_config(hf_tiny), hf_tiny)
        net.set_train(True)
        for _, cell in net.cells_and_names():
            if isinstance(cell, Linear) and kind != "plain":
                cell.dense = ChunkedBackwardDense(2) if kind == "chunked" else NativeBackwardDense(
                    native.linear_backward)
        params = ParameterTuple(net.trainable_params())
        accum = ParameterTuple(Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"g{kind}.{p.name}",
                                         requires_grad=False) for p in params)
        ids = Tensor(np.stack([r[0] for r in make_rows(2, 17, seed=6)]))
        AccumulateGrads(CausalLMLoss(net, PAD), params, accum)(ids, ids, Tensor(1.0, ms.float32)).asnumpy()
        return [a.asnumpy() for a in accum]

    plain = grads("plain")
    for ours, ref in zip(grads("chunked"), plain, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    if native is not None:
        for ours, ref in zip(grads("native"), plain, strict=True):
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)

    net = build_model("custom", load_config(hf_tiny), hf_tiny)
    chosen = choose_backwards(net, 32, native, min_features=64)  # every linear shape of the tiny model is timed
    assert set(chosen.values()) <= {"mindspore", "chunked", "native"} and chosen
    kinds = {"chunked": ChunkedBackwardDense, "native": NativeBackwardDense, "mindspore": type(None)}
    for _, cell in net.cells_and_names():
        if isinstance(cell, Linear):
            assert type(cell.dense) is kinds[chosen["x".join(map(str, cell.weight.shape))]]


def _ranks(output_dir: Path, role: bytes = b"MS_WORKER") -> dict[int, int]:
    """{rank: pid} of the `zoo train` ranks writing into `output_dir` (msrun's workers: RANK_ID in their env), or
    with role MS_SCHED its scheduler process ({0: pid})."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if str(output_dir).encode() in cmd and env.get(b"MS_ROLE") == role:
            found[int(env.get(b"RANK_ID", b"0"))] = int(proc.name)
    return found


def test_data_parallel_ranks_stop_after_the_same_step_on_one_ranks_signal_or_the_launchers_death(tmp_path, hf_tiny):
    """msrun does not pass SIGTERM on, and dies without stopping its ranks; a signal to one rank, or msrun's death,
    stops every rank after the same step (agreed in the loss's all-reduce), rank 0 saves it (a slow save too: no
    rank exits before it is written), and --resume under msrun finishes (through a 35-second stall of rank 0)."""
    import signal
    import time

    data = mindrecord(tmp_path / "d.mindrecord", make_rows(64, 17, seed=7))
    spec = tmp_path / "dp.json"
    spec.write_text(json.dumps({"parallel": {"data_parallel": 2}}))
    run = tmp_path / "run"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    msrun, zoo_bin = shutil.which("msrun", path=env["PATH"]), shutil.which("zoo", path=env["PATH"])
    metrics = run / "metrics.jsonl"

    # with slow_save, rank 0 writes checkpoints as slowly as a real model's: the first one for over 30 s (a collective
    # on MindSpore's CPU backend gives up after ≈30 s of waiting: the other ranks must keep in touch while they
    # wait), the next ones with a 6-second pause before the rename (msrun kills every rank once one exits non-zero,
    # so none may leave before the checkpoint is in place); with pause, rank 0 stalls for 35 s before its second
    # step's all-reduce (as a rank compiling while the other loads its graphs from the compile cache), which the
    # other rank's wait outlasts only by the plugin's longer MS_NODE_TIMEOUT
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(f"""
import builtins, os, time
rank0 = os.environ.get('RANK_ID') == '0' and os.environ.get('MS_ROLE') == 'MS_WORKER'
if rank0 and os.environ.get('ZOO_TEST_PAUSE'):
    real_getppid, calls = os.getppid, []

    def paused_getppid():  # the trainer asks once at start, then once a step
        calls.append(1)
        if len(calls) == 3:
            time.sleep(35)
            open({str(inject / "paused")!r}, 'w').close()
        return real_getppid()

    os.getppid = paused_getppid
if rank0 and os.environ.get('ZOO_TEST_SLOW_SAVE'):
    real_open, real_rename, first = builtins.open, os.rename, [time.monotonic(), None]

    class Slow:
        def __init__(self, f):
            self.f = f
        def write(self, b):
            first[1] = first[1] or time.monotonic()
            time.sleep(0.45)
            return self.f.write(b)
        def __enter__(self):
            return self
        def __exit__(self, *a):
            return self.f.__exit__(*a)
        def __getattr__(self, name):
            return getattr(self.f, name)

    def slow_open(path, mode='r', *a, **k):
        f = real_open(path, mode, *a, **k)
        return Slow(f) if first[0] and '.checkpoint-' in str(path) and 'w' in mode else f

    def slow_rename(src, dst, *a, **k):
        if os.path.basename(dst).startswith('checkpoint-'):
            if first[0]:
                real_open({str(inject / "first_save_s")!r}, 'w').write(str(time.monotonic() - first[1]))
                first[0] = None
            else:
                time.sleep(6)
        return real_rename(src, dst, *a, **k)

    builtins.open, os.rename = slow_open, slow_rename
""")
    injected = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))}

    def launch(steps: int, name: str, slow_save: bool = False, save_steps: int = 100000,
               port: int = 8233, pause: bool = False) -> subprocess.Popen:
        run_env = env | (injected if slow_save or pause else {}) | \
            ({"ZOO_TEST_SLOW_SAVE": "1"} if slow_save else {}) | ({"ZOO_TEST_PAUSE": "1"} if pause else {})
        return subprocess.Popen(
            [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
             f"--log_dir={tmp_path / name}", zoo_bin, "train", "wizardcoder-tiny", "--config",
             str(hf_tiny / "config.json"), "--weights", str(hf_tiny), "--data", str(data), "--output-dir", str(run),
             "--max-steps", str(steps), "--batch-size", "1", "--save-steps", str(save_steps), "--spec", str(spec),
             "--resume"], env=run_env, cwd=tmp_path, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def wait_rows(n: int, proc: subprocess.Popen) -> None:
        deadline = time.time() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n) and time.time() < deadline:
            assert proc.poll() is None, f"msrun exited {proc.returncode}"
            time.sleep(0.05)

    def logs(name: str) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / name).glob("worker_*.log"))

    def ranks_gone(pids: list[int]) -> bool:
        deadline = time.time() + 120
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        return not any(Path(f"/proc/{p}").exists() for p in pids)

    proc = launch(10000, "a", slow_save=True, save_steps=2)
    wait_rows(3, proc)  # past the first, slow, save
    assert float((inject / "first_save_s").read_text()) > 32
    ranks = _ranks(run)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)  # rank 1 only
    proc.wait(180)
    steps = len(metrics.read_text().splitlines())
    assert [p.name for p in checkpoints(run)][-1] == f"checkpoint-{steps}", logs("a")
    assert "rank 0: another rank was interrupted: stopping after step" in logs("a")

    proc = launch(10000, "b", port=8234)
    wait_rows(steps + 3, proc)
    ranks, scheduler = _ranks(run), _ranks(run, b"MS_SCHED")
    proc.kill()  # the launcher dies; its ranks, in sessions of their own, live on
    proc.wait()
    try:
        assert ranks_gone(list(ranks.values())), logs("b")
    finally:  # its scheduler outlives the ranks for a while (until its heartbeats time out): not the test's to wait
        for pid in scheduler.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    stopped = len(metrics.read_text().splitlines())
    assert [p.name for p in checkpoints(run)][-1] == f"checkpoint-{stopped}", logs("b")
    assert "the launcher exited: stopping after step" in logs("b")

    proc = launch(stopped + 2, "c", port=8235, pause=True)
    assert proc.wait(300) == 0, logs("c")
    assert (inject / "paused").is_file()
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, stopped + 3))

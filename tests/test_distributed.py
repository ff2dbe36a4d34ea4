"""Several processes on one CPU over gloo: two processes with half batches train exactly as one process with
the whole batch (global negatives, gradients through the gather), resume after a kill, and a hanging rank
fails in seconds."""
import dataclasses
import datetime
import os
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

import clip_utils as cu

COLLECTIVE_TIMEOUT_S = 20  # a process that waits this long for the others raises (torch's default is 30 minutes)
LAUNCH_DEADLINE_S = 240  # the whole launch, start-up included; a hanging launch is killed and fails the test
B, WORLD = 8, 2  # the global batch and the number of processes
IMAGE_IDS = [0, 1, 2, 3, 0, 5, 2, 7]  # images 0 and 2 have a caption on each process's half


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, worker, args):
    """One spawned process: join the gloo group through Accelerate, with a short collective timeout."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate import PartialState

    PartialState(cpu=True, backend="gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    worker(rank, world, *args)


def _launch(worker, *args, world=WORLD):
    """Run worker(rank, world, *args) in `world` fresh processes; raise if one fails or the deadline passes."""
    context = mp.start_processes(_entry, args=(world, _free_port(), worker, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.time() + LAUNCH_DEADLINE_S
    try:
        while not context.join(timeout=1):  # raises as soon as one process fails, ending the others
            if time.time() > deadline:
                raise TimeoutError(f"the {world} processes were still running after {LAUNCH_DEADLINE_S}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# -- one process with batch B against two with B/2 each -----------------------

def _tiny():
    """A tiny CLIP model and one global batch, the same in every process."""
    from transformers import BertConfig, BertModel

    cfg = cu.Config.quick(image_size=32, batch_size=B, dropout=0.0, head_lr=1e-2, image_encoder_lr=1e-2,
                          text_encoder_lr=1e-2, weight_decay=0.1, patience=0, factor=0.5, device="cpu",
                          precision="fp32",  # bf16 autocast would round the two runs differently
                          image_model_kwargs=dict(channels=(8, 16, 16, 32), stem_width=8,
                                                  zero_init_last=False))  # every weight gets a real gradient
    cu.config._seed_everything(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16))
    model = cu.CLIPModel(cfg, cu.ImageEncoder(cfg), cu.TextEncoder(cfg, bert))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 32, 32, generator=g)
    images[4] = images[0] + 0.1 * torch.randn(3, 32, 32, generator=g)  # another caption of image 0
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[::3, 4:] = 0  # some captions are shorter
    batch = dict(images=images, input_ids=torch.randint(1, 50, (B, 6), generator=g), attention_mask=mask,
                 image_ids=torch.tensor(IMAGE_IDS))
    val = {k: v[:5] for k, v in batch.items()}  # a ragged validation batch: shares of 3 and 2 rows
    return model, cfg, batch, val


def _gather_without_grad(x):
    """The negative control: the others' rows arrive as constants, only this process's own keep a gradient."""
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x)
    parts[torch.distributed.get_rank()] = x
    return parts


def _two_steps(rank, world):
    """Two AdamW steps through train_step and a scheduler step on the validation loss; everything recorded."""
    model, cfg, batch, val = _tiny()
    model.eval()  # dropout and batch-norm batch statistics legitimately differ between B and B/2 rows
    accelerator = cu.train._accelerator(cfg)
    optimizer = cu.make_optimizer(model, cfg)
    for group in optimizer.param_groups:  # Adam's first step is lr * sign(g): rounding noise on a gradient that
        group["eps"] = 1e-4  # is zero in exact arithmetic (e.g. attention key biases) would move a weight by lr
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.factor, patience=cfg.patience)
    grads = []
    optimizer.register_step_pre_hook(lambda *_: grads.append(
        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    trained, optimizer = accelerator.prepare(model, optimizer)
    share = lambda b: {k: v.tensor_split(world)[rank] for k, v in b.items()}  # contiguous, in rank order
    losses = [cu.train_step(trained, share(batch), optimizer, cfg, accelerator) for _ in range(2)]
    val_losses = [cu.train._validate(trained, [share(val)], cfg, accelerator)["val_loss"] for _ in range(2)]
    for val_loss in (val_losses[0], val_losses[0] + 1):  # the second call is worse: the plateau cuts the rates
        scheduler.step(val_loss)
    return dict(losses=losses, grads=grads, val_loss=val_losses[0], lrs=[g["lr"] for g in optimizer.param_groups],
                params={name: p.detach().clone() for name, p in model.named_parameters()})


def _equivalence_worker(rank, world, out):
    """Each process: the real gather, then the control without gradient; rank r saves its results."""
    real = _two_steps(rank, world)
    cu.losses._all_gather_with_grad, saved = _gather_without_grad, cu.losses._all_gather_with_grad
    control = _two_steps(rank, world)
    cu.losses._all_gather_with_grad = saved
    try:  # fit refuses a global batch that does not split evenly, before it touches the model
        cu.fit(None, None, None, None, dataclasses.replace(_tiny()[1], batch_size=7))
    except ValueError as error:
        odd_batch = str(error)
    torch.save(dict(real=real, control=control, odd_batch=odd_batch), Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with the whole batch (here), and two processes with halves (spawned once for both tests)."""
    out = tmp_path_factory.mktemp("equivalence")
    _launch(_equivalence_worker, str(out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return _two_steps(0, 1), ranks


def _assert_same_training(one, two):
    close = dict(rtol=1e-4, atol=1e-6)
    for step, (g1, g2) in enumerate(zip(one["grads"], two["grads"])):
        assert g1.keys() == g2.keys() and "logit_scale" in g1
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], **close, msg=lambda m: f"step {step} grad {name}: {m}")
    for name in one["params"]:
        torch.testing.assert_close(two["params"][name], one["params"][name], **close, msg=lambda m: f"{name}: {m}")
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5), "loss"
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-5), "val loss"
    assert one["lrs"] == pytest.approx(two["lrs"], rel=1e-9) and one["lrs"][0] < 1e-2, "scheduler"


def test_two_processes_with_half_batches_train_as_one_process_with_the_whole(runs):
    one, ranks = runs
    for rank in ranks:  # both processes hold the one-process model after every step
        _assert_same_training(one, rank["real"])
    assert one["losses"][0] != one["losses"][1]  # the first step changed the model


def test_gathering_without_gradient_fails_the_same_checks(runs):
    """The control proves the checks can fail: without the others' gradients, the towers learn from half the loss."""
    one, ranks = runs
    for rank in ranks:
        with pytest.raises(AssertionError, match="grad"):
            _assert_same_training(one, rank["control"])
    assert one["losses"][0] == pytest.approx(ranks[0]["control"]["losses"][0], rel=1e-5)  # same forward pass


def test_global_batch_must_divide_over_the_processes(runs):
    _, ranks = runs
    assert "batch_size=7 is the global batch" in ranks[0]["odd_batch"] and "multiple of 2" in ranks[0]["odd_batch"]


# -- resume with two processes ------------------------------------------------

def _resume_worker(rank, world, train, val, cfg, out):
    """An uninterrupted 2-process run, then one killed in its second validation and resumed."""
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    whole = cu.fit(model, tokenizer, train, val, cfg)
    whole_params = {k: v.clone() for k, v in model.state_dict().items()}

    killed = dataclasses.replace(cfg, out_dir=cfg.out_dir + "-killed")
    real_validate, calls = cu.train._validate, []

    def dies_in_second_validation(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("session killed")
        return real_validate(*args)

    cu.train._validate = dies_in_second_validation
    model, tokenizer = cu.build_model(killed, captions=train["caption"])
    try:
        cu.fit(model, tokenizer, train, val, killed)
    except KeyboardInterrupt:
        pass
    cu.train._validate = real_validate
    model, tokenizer = cu.build_model(killed, captions=train["caption"])
    resumed = cu.fit(model, tokenizer, train, val, killed, resume=True)
    torch.save(dict(whole=whole.to_dict("list"), resumed=resumed.to_dict("list"), whole_params=whole_params,
                    resumed_params=model.state_dict()), Path(out) / f"rank{rank}.pt")


def test_two_processes_resume_to_the_uninterrupted_run(synthetic, tiny_cfg, tmp_path):
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, epochs=2, hard_negatives=4, out_dir=str(tmp_path / "run"))
    _launch(_resume_worker, train.head(64), val.head(21), cfg, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    columns = ["epoch", "train_loss", "val_loss", "lr_image_encoder", "lr_text_encoder", "lr_heads", "temperature"]
    for rank in ranks:
        whole, resumed = (pd.DataFrame(rank[k])[columns] for k in ("whole", "resumed"))
        pd.testing.assert_frame_equal(resumed, whole, rtol=1e-5)
        for name, value in rank["whole_params"].items():
            torch.testing.assert_close(rank["resumed_params"][name], value, rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(*(pd.DataFrame(rank["whole"])[columns] for rank in ranks))  # one history
    saved = pd.read_csv(tmp_path / "run-killed" / "history.csv")
    assert list(saved["epoch"]) == [1, 2]  # written once per epoch, by the main process


# -- streaming shards with two processes ----------------------------------------

def _stream_worker(rank, world, folder, train, val, cfg, out):
    """fit from a shard folder whose shards split unevenly over the ranks; count each rank's steps."""
    steps = []
    real_embed = cu.train._ClipTask.embed

    def counted(*args, **kwargs):  # the training forward pass: once per step (k = 1)
        steps.append(1)
        return real_embed(*args, **kwargs)

    cu.train._ClipTask.embed = counted
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    history = cu.fit(model, tokenizer, folder, val, cfg)
    torch.save(dict(steps=len(steps), history=history.to_dict("list"), params=model.state_dict()),
               Path(out) / f"stream{rank}.pt")


def test_two_processes_stream_shards_in_step(synthetic, tiny_cfg, tmp_path):
    """3 shards of 30, 30 and 4 rows, dealt by rows: 34 and 30; both ranks take 30 // 4 = 7 steps an epoch."""
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, epochs=2, out_dir=str(tmp_path / "run"))
    folder = cu.write_shards(train.head(64), tmp_path / "shards", cfg, rows_per_shard=30)
    _launch(_stream_worker, str(folder), train.head(64), val.head(21), cfg, str(tmp_path))
    ranks = [torch.load(tmp_path / f"stream{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [rank["steps"] for rank in ranks] == [2 * 7] * WORLD
    pd.testing.assert_frame_equal(*(pd.DataFrame(rank["history"]).drop(columns="seconds") for rank in ranks))
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value)  # DDP kept the ranks in step


def _soft_target_worker(rank, world, train, val, cfg, out):
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    history = cu.fit(model, tokenizer, train, val, cfg)
    torch.save(dict(rows=len(history), learns_temperature=model.logit_scale.requires_grad),
               Path(out) / f"soft{rank}.pt")


def test_two_processes_train_with_the_soft_target_loss(synthetic, tiny_cfg, tmp_path):
    """The published loss has no temperature: DDP would stop at the second step over its missing gradient."""
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, epochs=1, loss="soft_target", out_dir=str(tmp_path / "run"))
    _launch(_soft_target_worker, train.head(40), val.head(16), cfg, str(tmp_path))
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"soft{rank}.pt") == dict(rows=1, learns_temperature=True)  # flag restored


# -- a hanging rank -----------------------------------------------------------

def _hanging_worker(rank, world):
    if rank == 1:
        time.sleep(3600)  # stuck (a dead data loader, an endless loop): it never joins the next collective
    torch.distributed.barrier()


def test_a_hanging_rank_fails_in_seconds():
    start = time.time()
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
        _launch(_hanging_worker)
    assert time.time() - start < COLLECTIVE_TIMEOUT_S + 60


def _command_line_process(rank, world, port):
    """A process as the command line runs one: its process group from launched(cfg); rank 1 hangs in training."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    from clip_utils.scale.launch import launched

    cfg = cu.Config.quick(device="cpu", collective_timeout_minutes=COLLECTIVE_TIMEOUT_S / 60)
    with launched(cfg):
        if rank == 1:
            time.sleep(3600)
        torch.distributed.barrier()  # a training collective: waits collective_timeout_minutes, not the data's 60


def test_a_hanging_rank_fails_the_command_line_within_the_configured_timeout():
    start = time.time()
    context = mp.start_processes(_command_line_process, args=(WORLD, _free_port()), nprocs=WORLD, join=False,
                                 start_method="spawn")
    try:
        with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
            while not context.join(timeout=1):
                assert time.time() - start < LAUNCH_DEADLINE_S, "still waiting: the timeout did not apply"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    assert time.time() - start < COLLECTIVE_TIMEOUT_S + 60


def test_the_readme_notebook_command_trains_on_two_processes(synthetic, tmp_path):
    """README's 2-GPU notebook line, on 2 CPU processes: notebook_launcher forks the command line's main."""
    import subprocess
    import sys

    _, train, val, _ = synthetic
    train.head(48).to_csv(tmp_path / "train.csv", index=False)
    val.head(16).to_csv(tmp_path / "val.csv", index=False)
    argv = ["--mode", "quick", "--epochs", "1", "--batch-size", "16", "--train-csv", str(tmp_path / "train.csv"),
            "--val-csv", str(tmp_path / "val.csv"), "--out-dir", str(tmp_path / "run")]
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import clip_utils as cu; "
              "from accelerate import notebook_launcher; "
              "notebook_launcher(cu.train.main, args=(sys.argv[2:],), num_processes=2)")
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).resolve().parents[1]), *argv],
                          capture_output=True, text=True, timeout=LAUNCH_DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 1

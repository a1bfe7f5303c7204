"""Fine-tuning (issue 9): LoRA adapters on the tiny model, LoRA checkpoints, resume, merge, full fine-tuning."""
import json

import pytest
import torch
import torch.nn.functional as F

from lit_hsa.cli import main
from lit_hsa.config import LORA_TARGETS, ConfigError, FinetuneConfig, ModelConfig, load_config
from lit_hsa.model.lora import ExpertLoRA, apply_lora, is_adapter_key, lora_state_dict, merge_lora
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.module import HSALitModule
from tests.helpers import FAST, ROOT, load_benchmark, run_dir, scalars

CHAT = ROOT / "examples" / "sft" / "chat.jsonl"
# The shipped LoRA config on the tiny model and the example chat file; CPU-sized.
LORA = ["fit", "--config", str(ROOT / "configs/finetune/lora.yaml"), *FAST, "model.name=tiny", "data.num_workers=0",
        f"data.sources=[{{kind: files, format: chat, paths: [{CHAT}]}}]", "data.val_fraction=0.2",
        "data.batch_size=2", "trainer.accumulate_grad_batches=1", "trainer.precision=32-true",
        "trainer.val_check_interval=100", "optim.schedule=constant"]


def lora_fit(tmp_path, name, *extra):
    assert main([*LORA, f"trainer.root_dir={tmp_path}", f"trainer.run_name={name}", *extra]) == 0
    return run_dir(tmp_path, name)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A trained tiny checkpoint (2 steps of configs/tiny.yaml) to fine-tune."""
    root = tmp_path_factory.mktemp("base")
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={root}", "trainer.run_name=base",
            *FAST, "data.num_workers=0", "trainer.max_steps=2", "trainer.val_check_interval=100"]
    assert main(args) == 0
    return run_dir(root, "base") / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_ckpt):
    """6 LoRA steps on every module group, a checkpoint every 3 steps."""
    root = tmp_path_factory.mktemp("lora")
    run = lora_fit(root, "straight", f"init_from={base_ckpt}", "trainer.max_steps=6",
                   "trainer.checkpoint_every_n_steps=3", f"finetune.lora_targets=[{','.join(LORA_TARGETS)}]")
    return root, run


def tiny_model(**overrides) -> HSATransformer:
    return HSATransformer(ModelConfig.from_name("tiny", vocab_size=320, **overrides))


def randomise_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (adapted = base); give every adapter a non-zero update."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_key(name):
                p.normal_(0.0, 0.05)


def test_lora_trains_adapter_weights_only():
    model = tiny_model()
    n = apply_lora(model, FinetuneConfig(method="lora", lora_targets=list(LORA_TARGETS), lora_rank=4))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_key(k) for k in trainable)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 320, (2, 97))
    for _ in range(3):
        (model(x[:, :-1], labels=x[:, 1:]) + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every adapter moved, no base weight did (bit-identical)


def test_merged_model_gives_the_adapted_logits():
    model = tiny_model().eval()
    plain_keys = set(model.state_dict())
    apply_lora(model, FinetuneConfig(method="lora", lora_targets=list(LORA_TARGETS), lora_rank=4))
    randomise_adapters(model)
    x = torch.randint(0, 320, (2, 96))
    adapted = model(x)
    merge_lora(model)
    assert set(model.state_dict()) == plain_keys and all(p.requires_grad for p in model.parameters())
    # fp32; the folded weights W + s·B·A round differently from the two-path sum: 1e-5 absolute on logits ~1
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)


def test_expert_lora_changes_moe_outputs_and_trains():
    model = tiny_model()
    apply_lora(model, FinetuneConfig(method="lora", lora_targets=["experts"], lora_rank=4))
    moe = model.moe_layers()[0]
    assert isinstance(moe.lora_experts, ExpertLoRA) and moe.lora_experts.lora_gate_A.shape == (4, 128, 4)
    x = torch.randn(2, 16, 128)
    base = moe(x)
    randomise_adapters(model)
    adapted = moe(x)
    assert (adapted - base).abs().max() > 1e-3
    adapted.square().mean().backward()
    grads = {k: p.grad for k, p in moe.named_parameters() if p.requires_grad}
    routed = [f"lora_experts.lora_{w}_{m}" for w in ("gate", "up", "down") for m in "AB"]
    shared = [f"shared.w_{w}.lora_{m}" for w in ("gate", "up", "down") for m in "AB"]  # the shared expert too
    assert sorted(grads) == sorted(routed + shared)
    assert moe.router.weight.grad is None and moe.w_gate.grad is None  # router and base experts stay frozen
    # the definition, token by token: expert e computes with w[e] + scale · A[e] B[e]; same output, same gradients
    lora = moe.lora_experts
    leaves = {f"{w}_{m}": getattr(lora, f"lora_{w}_{m}").detach().clone().requires_grad_()
              for w in ("gate", "up", "down") for m in "AB"}
    eff = {w: getattr(moe, f"w_{w}").detach() + lora.scale * torch.bmm(leaves[f"{w}_A"], leaves[f"{w}_B"])
           for w in ("gate", "up", "down")}
    xf = x.reshape(-1, 128)
    scores = torch.sigmoid(moe.router(xf).float()).detach()
    rows = []
    for n in range(xf.shape[0]):
        chosen = (scores[n] + moe.expert_bias).topk(moe.top_k).indices
        gates = scores[n, chosen] / scores[n, chosen].sum()
        rows.append(sum(g * ((F.silu(xf[n] @ eff["gate"][e]) * (xf[n] @ eff["up"][e])) @ eff["down"][e])
                        for g, e in zip(gates, chosen)))
    expected = (torch.stack(rows) + moe.shared(xf).detach()).view_as(adapted)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)
    expected.square().mean().backward()
    for name, leaf in leaves.items():  # fp32 sums in another order: 1e-5 relative
        torch.testing.assert_close(grads[f"lora_experts.lora_{name}"], leaf.grad, rtol=1e-4, atol=1e-6)


def test_lora_with_a_bf16_base_halves_its_matrices_and_trains_like_fp32():
    """finetune.lora_base_dtype=bf16: the frozen matrices (linears, stacked experts) are bf16, the embedding, norms
    and adapters keep fp32; under bf16 autocast (what bf16-mixed runs) the loss equals the fp32 base's within bf16
    rounding and the adapters' gradients are fp32 and finite."""
    def module(base_dtype):
        torch.manual_seed(0)
        ft = FinetuneConfig(method="lora", lora_targets=["attention", "retrieval", "experts"], lora_rank=8,
                            lora_base_dtype=base_dtype)
        return HSALitModule(ModelConfig.from_name("tiny", vocab_size=320), {}, finetune=ft)

    fp32, bf16 = module("fp32"), module("bf16")
    for m in (fp32, bf16):
        torch.manual_seed(2)
        randomise_adapters(m.model)  # the same adapters in both
    frozen = {n for n, p in bf16.named_parameters() if not p.requires_grad and p.dim() >= 2}
    for name, p in bf16.named_parameters():
        want = torch.bfloat16 if name in frozen and name != "model.embed.weight" else torch.float32
        assert p.dtype == want, name
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert bytes_of(bf16) < 0.7 * bytes_of(fp32)
    x = torch.randint(0, 320, (2, 97), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (fp32, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.model(x[:, :-1], labels=x[:, 1:])
        loss.backward()
        losses.append(loss.detach())
    assert abs(losses[1] - losses[0]) <= 1e-2 * losses[0]
    grads = [p.grad for p in bf16.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ConfigError, match="lora_base_dtype=bf16 keeps a LoRA run's frozen base in bf16"):
        load_config(None, ["init_from=configs/tiny.yaml", "finetune.method=lora", "finetune.lora_base_dtype=bf16"])


def test_bad_finetune_config_is_a_clear_error(tmp_path, base_ckpt):
    with pytest.raises(ConfigError, match=r"finetune.lora_targets: 'attn' is not one of .*did you mean 'attention'"):
        load_config(None, [f"init_from={base_ckpt}", "finetune.method=lora", "finetune.lora_targets=[attn]"])
    with pytest.raises(ConfigError, match=r"finetune.method: 'qlora' is not one of .*did you mean 'lora'"):
        load_config(None, [f"init_from={base_ckpt}", "finetune.method=qlora"])
    with pytest.raises(ConfigError, match="finetune.method=lora fine-tunes a trained model: set init_from="):
        load_config(None, ["finetune.method=lora"])
    with pytest.raises(ConfigError, match="match no module of this model"):  # tiny with moe off has no router
        HSALitModule(ModelConfig.from_name("tiny", vocab_size=320, moe=False), {},
                      finetune=FinetuneConfig(method="lora", lora_targets=["router"]))


def test_lora_checkpoint_holds_only_trainable_weights(lora_run, base_ckpt):
    _, run = lora_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    module = HSALitModule(**ckpt["hyper_parameters"])
    assert set(ckpt["state_dict"]) == set(lora_state_dict(module))
    frozen = [k for k in ckpt["state_dict"] if not is_adapter_key(k)]
    assert frozen and all(k.endswith(".expert_bias") for k in frozen)  # + MoE balancing biases (buffers)
    assert ckpt["lora_base"]["path"] == str(base_ckpt.resolve()) and len(ckpt["lora_base"]["fingerprint"]) == 16
    assert ckpt["optimizer_states"] and ckpt["global_step"] == 6


def test_lora_resume_reproduces_the_uninterrupted_run(lora_run, base_ckpt):
    root, straight = lora_run
    targets = f"finetune.lora_targets=[{','.join(LORA_TARGETS)}]"
    first = lora_fit(root, "first", f"init_from={base_ckpt}", "trainer.max_steps=3", targets)
    # No init_from: the frozen base comes from the path recorded in the LoRA checkpoint.
    resumed = lora_fit(root, "resumed", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=6",
                       targets)
    expected, got = scalars(straight, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(got) == [3, 4, 5]
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step


def test_mismatching_base_checkpoint_is_one_clear_error(lora_run, base_ckpt, tmp_path, capsys):
    _, run = lora_run
    lora_ckpt = run / "checkpoints" / "last.ckpt"
    base = torch.load(base_ckpt, weights_only=False)
    base["state_dict"]["model.norm.weight"] += 0.5  # same shapes, other weights
    torch.save(base, tmp_path / "other.ckpt")
    base["state_dict"]["model.norm.weight"] = torch.ones(64)  # another shape
    torch.save(base, tmp_path / "shape.ckpt")
    targets = f"finetune.lora_targets=[{','.join(LORA_TARGETS)}]"
    cases = [([*LORA, f"trainer.root_dir={tmp_path}", f"ckpt_path={lora_ckpt}", f"init_from={tmp_path / 'other.ckpt'}",
               targets], "is not the one the LoRA adapters were trained on"),
             ([*LORA, f"trainer.root_dir={tmp_path}", f"ckpt_path={lora_ckpt}", f"init_from={tmp_path / 'shape.ckpt'}",
               targets], "model.norm.weight (64,) vs (128,)"),
             (["merge", "--ckpt", str(lora_ckpt), "--base", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "m")],
              "is not the one the LoRA adapters were trained on"),
             ([*LORA, f"trainer.root_dir={tmp_path}", f"init_from={lora_ckpt}", "finetune.method=full"],
              "holds LoRA adapters only"),
             ([*LORA, f"trainer.root_dir={tmp_path}", f"ckpt_path={base_ckpt}"], "is not a LoRA checkpoint")]
    for args, needle in cases:
        capsys.readouterr()
        assert main(args) == 2, needle
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "m").exists()


def test_sft_lora_with_other_topk_and_window(tmp_path, base_ckpt):
    """The shipped config on chat data (loss on answers only); top-k and SWA window differ from the checkpoint's."""
    run = lora_fit(tmp_path, "sft", f"init_from={base_ckpt}", "trainer.max_steps=2", "model.hsa_topk=2",
                   "model.swa_window=32")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    model = ckpt["hyper_parameters"]["model"]
    assert (model["hsa_topk"], model["swa_window"]) == (2, 32)
    assert torch.load(base_ckpt, weights_only=False)["hyper_parameters"]["model"]["hsa_topk"] == 4
    assert len(scalars(run, "train/loss")) == 2


def test_merge_writes_a_checkpoint_that_generate_loads(lora_run, base_ckpt, tmp_path, capsys):
    _, run = lora_run
    lora_ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "merged.ckpt"
    assert main(["merge", "--ckpt", str(lora_ckpt), "--out", str(out)]) == 0
    merged, base = torch.load(out, weights_only=False), torch.load(base_ckpt, weights_only=False)
    assert "finetune" not in merged["hyper_parameters"] and set(merged["state_dict"]) == set(base["state_dict"])
    assert not torch.equal(merged["state_dict"]["model.lower.0.attn.q_proj.weight"],
                           base["state_dict"]["model.lower.0.attn.q_proj.weight"])  # the adapters were folded in
    capsys.readouterr()
    args = ["generate", "--ckpt", str(out), "--prompt", "What is 2 + 3?", "--max-new-tokens", "8", "--device", "cpu"]
    assert main(args) == 0 and capsys.readouterr().out.strip("\n")
    assert main([*args[:2], str(lora_ckpt), *args[3:]]) == 2  # adapters alone are not a model
    assert "python main.py merge" in capsys.readouterr().err
    HSALitModule.load_from_checkpoint(out, map_location="cpu")  # strict: exactly the plain model's keys


def test_full_finetuning_trains_every_weight(tmp_path, base_ckpt):
    # seq_len 128: with 64 a token sees at most one chunk, whose fusion weight is 1 and gives retrieval no gradient
    run = lora_fit(tmp_path, "full", "finetune.method=full", f"init_from={base_ckpt}", "trainer.max_steps=2",
                   "optim.lr=1e-3", "data.seq_len=128")
    ckpt, base = (torch.load(p, weights_only=False) for p in (run / "checkpoints" / "last.ckpt", base_ckpt))
    assert ckpt["hyper_parameters"]["finetune"]["method"] == "full"
    assert set(ckpt["state_dict"]) == set(base["state_dict"])
    params = dict(HSALitModule(**base["hyper_parameters"]).named_parameters())
    unchanged = [k for k in params if torch.equal(ckpt["state_dict"][k], base["state_dict"][k])]
    assert not unchanged


def test_bench_finetune_smoke_on_cpu(tmp_path):
    bench = load_benchmark("bench_finetune")
    result = bench.main(["--preset", "tiny", "--lengths", "256", "--warmup", "1", "--steps", "1", "--device", "cpu",
                         "--out", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    row = result["rows"][0]
    assert row["T"] == 256 and row["full"]["ok"] and row["lora"]["ok"]
    assert row["lora"]["trainable_params"] < row["full"]["trainable_params"] / 10

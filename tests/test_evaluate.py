"""`moda_jax.evaluate` and `mc_tasks`: a micro training run on 1 device, evaluated on 8."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moda_jax.train import checkpoint
from moda_jax.eval import evaluate
from moda_jax.eval import mc_tasks
from moda_jax.train import sharding
from moda_jax.data import tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--config.total_steps=3", "--config.batch_size=8", "--config.seq_len=32",
         "--config.eval_every=3", "--config.checkpoint_every=3", "--config.log_every=1",
         "--config.warmup_steps=1", "--config.progress_bar=False", "--config.checkpoint_async=False",
         "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
         "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
         "--config.model.max_seq_len=64",
         "--config.model.attention_impl=reference"]  # the cheapest kernel to compile at T=32


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 3-step run of the tiny config shrunk further, trained on ONE device (subprocess)."""
  path = str(tmp_path_factory.mktemp("run"))
  subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={path}", *MICRO],
                 cwd=REPO, env=_env(1), check=True, capture_output=True, timeout=600)
  return path


def test_cli_reproduces_trainers_validation_loss_on_another_device_count(workdir, tmp_path):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    trainer_record = [json.loads(line) for line in f][-1]
  assert trainer_record["step"] == 3 and "val_loss" in trainer_record

  out = subprocess.run([sys.executable, "-m", "moda_jax.evaluate", f"--workdir={workdir}",
                        "--builtin_examples=8"], cwd=str(tmp_path), env=_env(8), check=True,
                       capture_output=True, text=True, timeout=600)
  with open(os.path.join(workdir, "eval", "step_3.json")) as f:
    report = json.load(f)
  assert report["step"] == 3
  assert report["devices"] == 8  # trained on 1 device, restored and evaluated on 8
  val = report["datasets"]["validation"]
  assert abs(val["loss"] - trainer_record["val_loss"]) < 1e-4
  assert val["perplexity"] == pytest.approx(np.exp(val["loss"]), rel=1e-6)
  assert 0.0 <= report["tasks"]["held_out_continuation"]["accuracy"] <= 1.0
  assert "validation" in out.stdout and "held_out_continuation" in out.stdout


def test_local_files_and_task_files(workdir, tmp_path):
  """A text file scores every token once; jsonl task files of each layout are read and scored."""
  text = tmp_path / "notes.txt"
  text.write_text("MoDA attends to depth. " * 5)
  hellaswag = tmp_path / "hs.jsonl"
  hellaswag.write_text("\n".join(json.dumps({"ctx": "The cat sat on the", "endings": [
      "mat.", "moon.", "idea.", "verb."], "label": i % 4}) for i in range(3)))
  report = evaluate.evaluate(workdir, data_paths=[str(text)], task_paths=[str(hellaswag)],
                             builtin_examples=0)
  # One document: its bytes plus the end token give exactly len(bytes) next-token targets.
  assert report["datasets"]["notes"]["tokens"] == len(text.read_text().encode())
  assert report["tasks"]["hs"]["examples"] == 3
  assert "held_out_continuation" not in report["tasks"]


def test_load_checkpoint_onto_a_mesh_equals_single_device(workdir):
  mesh = evaluate.eval_mesh(8)
  assert mesh.size == 8
  _, model, on_mesh = checkpoint.load_checkpoint(workdir, sharding=sharding.replicated(mesh))
  _, _, on_one = checkpoint.load_checkpoint(workdir)
  for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(on_one)):
    assert len(a.sharding.device_set) == 8 and len(b.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_document_batches_cover_every_token_once():
  tok = tokenizers.ByteTokenizer()
  docs = ["a" * 70, "bc", "d" * 31]
  batches = list(evaluate.document_batches(docs, tok, seq_len=32, batch_size=4))
  targets = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
  want = np.concatenate([np.append(tok.encode(d), tok.eos_id)[1:] for d in docs])
  np.testing.assert_array_equal(targets, want)
  for b in batches:
    valid = b["segment_ids"] > 0
    np.testing.assert_array_equal(b["inputs"][:, 1:][valid[:, 1:]], b["targets"][:, :-1][valid[:, 1:]])


@pytest.mark.parametrize("record, want", [
    ({"ctx": "A man", "endings": ["runs", "sits"], "label": "1"}, ("A man", ("runs", "sits"), 1)),
    ({"ctx_a": "A man", "ctx_b": "then", "endings": ["x", "y"], "label": 0},
     ("A man then", ("x", "y"), 0)),
    ({"question": {"stem": "2+2?", "choices": [{"text": "3", "label": "A"}, {"text": "4", "label": "B"}]},
      "answerKey": "B"}, ("Question: 2+2?\nAnswer:", ("3", "4"), 1)),
    ({"question": "2+2?", "choices": {"text": ["4", "5"], "label": ["1", "2"]}, "answerKey": "1"},
     ("Question: 2+2?\nAnswer:", ("4", "5"), 0)),
    ({"goal": "Open a jar", "sol1": "twist", "sol2": "pull", "label": 0},
     ("Question: Open a jar\nAnswer:", ("twist", "pull"), 0)),
    ({"query": "Q", "choices": ["a", "b", "c"], "gold": 2}, ("Q", ("a", "b", "c"), 2)),
], ids=["hellaswag", "hellaswag-split-ctx", "arc-ai2", "arc-hf", "piqa", "generic"])
def test_task_layouts(record, want):
  assert mc_tasks.parse_record(record, "f:1") == mc_tasks.Example(*want)


@pytest.mark.parametrize("record, match", [
    ({"goal": "g", "sol1": "a", "sol2": "b"}, "label"),
    ({"ctx": "c", "endings": ["a", "b"], "label": 2}, "outside"),
    ({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}, "answerKey"),
    ({"text": "no task here"}, "unrecognized"),
])
def test_bad_task_records_raise(record, match):
  with pytest.raises(ValueError, match=match):
    mc_tasks.parse_record(record, "f:1")


def test_accuracy_raw_and_length_normalized():
  """A scorer with known log-likelihoods: raw picks the short choice, normalized the long one."""
  examples = [mc_tasks.Example("ctx", ("ab", "abcdefgh"), 1)] * 2
  fixed = np.array([-3.0, -8.0, -3.0, -8.0])  # per byte: 3/3 = 1.0 vs 8/9 = 0.89
  result = mc_tasks.evaluate_task(lambda *_: fixed, None, examples,
                                  tokenizers.ByteTokenizer().encode, 16)
  assert result == {"accuracy": 0.0, "accuracy_norm": 1.0, "examples": 2, "chance": 0.5}


def test_row_scorer_equals_direct_log_likelihood():
  """Scores of padded, batched rows equal log p(choice | context) from one unpadded forward pass."""
  from moda_jax import ModelConfig, Transformer
  cfg = ModelConfig(vocab_size=257, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1,
                    head_dim=16, mlp_dim=32, max_seq_len=32, init_std=0.3, attention_impl="reference")
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  enc = tokenizers.ByteTokenizer().encode
  ex = mc_tasks.Example("The cat", ("sat.", "ran!"), 0)  # equal lengths: one compiled direct pass
  scores = mc_tasks.make_row_scorer(model, 3)(params, *mc_tasks._choice_rows([ex], enc, 24))
  apply = jax.jit(model.apply)
  for choice, score in zip(ex.choices, scores):
    ids = np.concatenate([enc(ex.context), enc(" " + choice)])
    logp = jax.nn.log_softmax(apply({"params": params}, ids[None, :-1])[0], axis=-1)
    n = len(enc(" " + choice))
    want = sum(float(logp[len(ids) - 1 - n + i, ids[len(ids) - n + i]]) for i in range(n))
    assert score == pytest.approx(want, abs=1e-4)


def test_continuation_task_uses_true_text_and_other_documents():
  docs = [f"{c}" * 300 for c in "abcde"]
  examples = mc_tasks.continuation_task(docs, num_examples=20, context_chars=40,
                                        continuation_chars=10, seed=1)
  assert len(examples) == 20
  for ex in examples:
    own = ex.context[0]
    assert ex.choices[ex.label] == own * 10
    assert all(c[0] != own for i, c in enumerate(ex.choices) if i != ex.label)
  assert len({ex.label for ex in examples}) > 1  # the answer position is shuffled
  with pytest.raises(ValueError, match="num_choices"):
    mc_tasks.continuation_task(docs[:3], num_choices=4)


def test_package_exports_load_checkpoint(workdir):
  import moda_jax
  config, model, params = moda_jax.load_checkpoint(workdir, step=3)
  assert isinstance(model, moda_jax.Transformer) and config.total_steps == 3
  assert model.config == moda_jax.ModelConfig.from_dict(config.model.to_dict())
  assert jax.tree.leaves(params)

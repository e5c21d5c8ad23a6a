#!/usr/bin/env bash
# Device check of `%%dreamer_train NAME --processes N` on every GPU of this machine, with nccl,
# in a real Jupyter kernel (nbclient): a tiny GPT-2 trained by N workers (one per GPU), the
# kernel holding the trained weights afterwards; the same cell again a hit; the last worker
# SIGKILLed mid-run, the re-run resuming from the newest checkpoint. Under 2 minutes on a GPU machine
# (kernel start and imports are most of it); exits 0 with "skip" where there is no CUDA.
#
#   bash scripts/gpu-check.sh                  # PYTHON=... to pick the interpreter (default .venv/bin/python)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
cd "$ROOT"
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
if [ "$GPUS" = "0" ]; then
    echo "gpu-check: skip (no CUDA device visible to torch)"
    exit 0
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GPUS
exec timeout 290 "$PYTHON" - <<'EOF'
import json, os, sys, tempfile, time
import nbformat
from nbclient import NotebookClient

n = int(os.environ["GPUS"])
work = tempfile.mkdtemp(prefix="gpu-check-")
setup = f"""
import json, os, sys
sys.path.insert(0, {os.path.join(os.getcwd(), "tests")!r})
%load_ext dreamer_magic
%dreamer output out
import torch, dreamer_magic
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
from _tiny import tiny_gpt2
model, tok = tiny_gpt2(n_layer=4, n_embd=256)
ds = Dataset.from_dict({{"text": [f"{{i}} the quick brown fox jumps over the lazy dog" for i in range(2048)]}}).map(
    lambda b: tok(b["text"], truncation=True, max_length=32, padding="max_length"), batched=True, remove_columns=["text"])
collator = DataCollatorForLanguageModeling(tok, mlm=False)
class Killer(TrainerCallback):  # SIGKILL the last worker at step $KILL_AT
    def on_train_begin(self, args, state, control, **kw):
        import torch.distributed as dist
        print("rank", os.environ["RANK"], "device", args.device, "backend", dist.get_backend())
    def on_step_end(self, args, state, control, **kw):
        if os.environ.get("RANK") == str({n} - 1) and str(state.global_step) == os.environ.get("KILL_AT"):
            os.kill(os.getpid(), 9)
initial = {{k: v.clone() for k, v in model.state_dict().items()}}
assert not torch.cuda.is_initialized(), "the check must start with CUDA untouched in the kernel"
"""
train = """
args = TrainingArguments(output_dir="x", max_steps=60, per_device_train_batch_size=16, save_steps=20,
                         logging_steps=10, report_to=[], disable_tqdm=True, ddp_find_unused_parameters=False)
trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Killer()])
trainer.train()
"""
head = f"%%dreamer_train gpu-check --processes {n}\n"
cells = [
    setup,
    head + train,
    "first = dreamer_magic.last_status(); trained = any(not torch.equal(v.cpu(), initial[k]) for k, v in model.state_dict().items())",
    head + train,  # the same cell again: a hit, no workers
    "hit = dreamer_magic.last_status(); os.environ['KILL_AT'] = '30'",
    head.replace("gpu-check", "gpu-kill") + train,
    "killed = dreamer_magic.last_status(); del os.environ['KILL_AT']",
    head.replace("gpu-check", "gpu-kill") + train,
    "resumed = dreamer_magic.last_status()",
    "print(json.dumps({'first': first.state, 'trained': trained, 'killed': killed.error, 'resumed': resumed.state,"
    " 'hit': hit.state, 'cuda_initialised_in_kernel': torch.cuda.is_initialized(),"
    " 'seconds': {'first': first.duration, 'resumed': resumed.duration}}))",
]
nb = nbformat.v4.new_notebook()
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
started = time.perf_counter()
NotebookClient(nb, kernel_name="python3", timeout=240, startup_timeout=120, allow_errors=True,
               resources={"metadata": {"path": work}}).execute()
for i, cell in enumerate(nb.cells[1:], 1):
    out = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    out += "".join(o.get("data", {}).get("text/plain", "") + "\n" for o in cell.outputs if o.output_type == "display_data")
    out += "".join(f"{o.ename}: {o.evalue}\n" for o in cell.outputs if o.output_type == "error")
    print(f"--- cell {i}: {cell.source.splitlines()[0][:70]}\n{out.strip()[-1500:]}")
result = json.loads([o.text for o in nb.cells[-1].outputs if o.get("name") == "stdout"][-1])
result["gpus"], result["wall"] = n, round(time.perf_counter() - started, 1)
print(json.dumps(result, indent=1))
printed = "".join(o.get("text", "") for o in nb.cells[1].outputs if o.output_type == "stream")
killed = result["killed"] or ""
ok = (
    result["first"] == "ran" and result["trained"] and "backend nccl" in printed
    and killed.startswith("failed at step") and killed.endswith("checkpoints kept, run again to resume")
    and result["resumed"] == "resumed from checkpoint-20" and result["hit"] == "loaded from disk"
)
print("gpu-check:", "ok" if ok else "FAILED", f"({n} GPUs, nccl, {result['wall']} s)")
sys.exit(0 if ok else 1)
EOF

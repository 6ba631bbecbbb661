"bench/: the scripts run end to end at tiny sizes, compare like with like, and print the summary lines their README quotes."
import re, subprocess, sys
from pathlib import Path
import pytest, torch

BENCH = Path(__file__).resolve().parent.parent / 'bench'
sys.path.insert(0, str(BENCH))
import common, step

def _run(script, *args):
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

def test_ratios_pair_each_variant_with_its_precision_and_the_fp32_reference():
    t = {'batched': 2., 'reference': 4., 'batched-bf16': 1., 'reference-bf16': 2.5}
    assert step.ratios(t) == {'batched-bf16/reference': 0.25, 'batched-bf16/reference-bf16': 0.4, 'batched/reference': 0.5}
    assert step.ratios({'batched': 3.}) == {}
    assert step.variants(['fp32', 'bf16'], with_ref=False) == {'batched': ('batched', 'fp32'), 'batched-bf16': ('batched', 'bf16')}

@pytest.mark.parametrize('stage', ['pretrain', 'posttrain', 'posttrain-tail'])
def test_batched_and_reference_compute_the_same_function(stage):
    "The two implementations timed by step.py run the same network: equal outputs from equal weights (deterministic stages)."
    torch.manual_seed(0)
    tasks = common.tasks_for(2); sm = common.make_supermodel(tasks).eval()
    ref = common.PerTaskReference(common.make_supermodel(tasks)).eval()
    x = torch.randn(1, 3, 32, 48)
    T, L = sm.logits.shape[:2]
    if stage == 'pretrain': a, b = sm.set_mode('warmup')(x), ref(x, torch.full((T, L, 3), 1 / 3))
    else:
        policy = step.fixed_policy(sm, stage, seed=1)
        if stage == 'posttrain-tail': assert policy.eq(0).all(0).sum() == round(0.75 * L)  # the first 3/4 shared by all tasks
        a, b = sm.set_policy(policy)(x), ref(x, policy=policy)
    for t in a: torch.testing.assert_close(a[t], b[t], rtol=1e-4, atol=1e-4)

def test_step_script_reports_every_stage_and_summary():
    out = _run('step.py', '--size', '32x48', '--bs', '1', '--reps', '1', '--precisions', 'fp32', 'bf16', '--no-memory')
    for s in step.STAGES: assert re.search(rf'^2 tasks {s} .*batched/reference = \d+\.\d\d', out, re.M), out
    assert re.search(r'^step: batched-bf16/reference = \d+\.\d\d \(policy-train, worst phase, 2 tasks\)$', out, re.M), out

def test_inference_and_compile_scripts_check_their_bounds():
    out = _run('inference.py', '--size', '32x64', '--reps', '1', '--no-reference')
    assert re.search(r'backbone convolutions run (\d+) times .* computed once = True', out), out
    assert re.search(r'^inference: derived/all-shared = \d+\.\d\d \(bound 1 \+ 0\.\d\d \+ 0\.10 = \d\.\d\d: (met|NOT met)\)$', out, re.M), out
    out = _run('compile.py', '--reps', '1')
    assert re.search(r'^compile: ', out, re.M), out

"bench/: the scripts run end to end at tiny sizes, compare like with like, and print the lines their README quotes."
import os, re, subprocess, sys
from pathlib import Path
import pytest, torch

BENCH = Path(__file__).resolve().parent.parent / 'bench'
sys.path.insert(0, str(BENCH))
import common, step, inference

ORIGINAL = os.environ.get('AUTOMTL_ORIGINAL')
HAS_ORIGINAL = bool(ORIGINAL) and (Path(ORIGINAL) / 'framework' / 'trainer.py').exists()

def _run(script, *args):
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

def test_summary_line_puts_ours_against_the_baseline():
    res = {'after_mix': {'s': 2., 'rss_gb': 2.5}, 'per_option': {'s': 3., 'rss_gb': 3.},
           'original': {'s': 4., 'rss_gb': 2.}}
    line = step.summary('pretrain', res, 'original')
    assert line == ('pretrain: original 4.00 s, ours (after_mix) 2.00 s, ratio 0.50 | per_option 3.00 s (0.75) | '
                    'peak RSS after_mix 2.50 GB, per_option 3.00 GB, original 2.00 GB')
    line = step.summary('posttrain', res, 'original')  # post-train's default placement is per_option
    assert line.startswith('posttrain: original 4.00 s, ours (per_option) 3.00 s, ratio 0.75 | after_mix 2.00 s (0.50)')
    assert (step.label('after_mix', 'bf16'), step.label('original', 'fp32')) == ('after_mix-bf16', 'original')
    assert [step._other_phase(s) for s in ('policy-weights', 'policy-policy', 'pretrain')] == \
        ['policy-policy', 'policy-weights', None]

@pytest.mark.parametrize('search_bn', ['per_option', 'after_mix'])
@pytest.mark.parametrize('stage', ['pretrain', 'posttrain', 'posttrain-tail'])
def test_ours_and_reference_compute_the_same_function(stage, search_bn):
    "The supermodel timed by step.py and the per-task oracle run the same network: equal outputs from equal weights."
    tasks = common.tasks_for(2)
    sm = common.make_supermodel(tasks, search_bn=search_bn).eval()
    ref = common.PerTaskReference(common.make_supermodel(tasks, search_bn=search_bn)).eval()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    T, L = sm.logits.shape[:2]
    with torch.no_grad():
        if stage == 'pretrain': a, b = sm.set_mode('warmup')(x), ref(x, torch.full((T, L, 3), 1 / 3), warmup=True)
        else:
            policy = step.fixed_policy(sm, stage, seed=1)
            if stage == 'posttrain-tail': assert policy.eq(0).all(0).sum() == round(0.75 * L)  # first 3/4 shared
            a, b = sm.set_policy(policy)(x), ref(x, policy=policy)
    for t in a: torch.testing.assert_close(a[t], b[t], rtol=1e-4, atol=1e-4)

def test_step_script_reports_every_stage_against_the_reference():
    "Without the original (not needed here), the per-task reference is the baseline; every stage gets its line."
    out = _run('step.py', '--size', '32x48', '--bs', '1', '--iters', '1', '--threads', '1', '--impls', 'after_mix',
               'reference', '--stages', 'pretrain', 'policy-policy')
    for s in ('pretrain', 'policy-policy'):
        assert re.search(rf'^{s}: reference \d+\.\d\d s, ours \(after_mix\) \d+\.\d\d s, ratio \d+\.\d\d \| '
                         rf'peak RSS after_mix \d+\.\d\d GB, reference \d+\.\d\d GB$', out, re.M), out
    assert re.search(r'^step: Deeplab-ResNet34 \+ 2 ASPP heads, 3x32x48, batch 1, 1 threads, .* CPU: .+; load', out,
                     re.M), out

@pytest.mark.skipif(not HAS_ORIGINAL, reason='times the original AutoMTL trainer: set AUTOMTL_ORIGINAL to its tree '
                                             '(see ../shared/original/README.md)')
def test_step_script_times_the_original():
    out = _run('step.py', '--original', ORIGINAL, '--size', '32x48', '--bs', '1', '--iters', '1', '--threads', '1',
               '--impls', 'after_mix', 'original', '--stages', 'policy-weights')
    assert re.search(r'^policy-weights: original \d+\.\d\d s, ours \(after_mix\) \d+\.\d\d s, ratio \d+\.\d\d \| '
                     r'peak RSS after_mix \d+\.\d\d GB, original \d+\.\d\d GB$', out, re.M), out

def test_specific_share_counts_the_macs_a_policy_adds():
    "inference.py's bound: task copies add their MACs, a shared op nobody runs any more removes its own."
    per_vcn, heads = {0: 10, 1: 20}, 70
    assert inference.specific_share(torch.tensor([[0, 1], [0, 0]]), per_vcn, heads) == 0.2  # one extra copy of VCN 1
    assert inference.specific_share(torch.tensor([[1, 1], [1, 0]]), per_vcn, heads) == 0.3  # VCN 0: 2 copies, no shared

VERDICT = re.compile(r'^inference: derived/all-shared = (\d+\.\d\d) \(bound 1 \+ (0\.\d\d) \+ 0\.10 = (\d\.\d\d): '
                     r'(met|NOT met)\)$', re.M)

def test_verdict_follows_the_ratio_and_the_bound():
    "The bound is 1 + f + 10%; a ratio at or under it is met, one over it is NOT met."
    line = inference.verdict_line(1.25, 0.2)
    assert line == 'inference: derived/all-shared = 1.25 (bound 1 + 0.20 + 0.10 = 1.30: met)'
    assert inference.verdict_line(1.36, 0.2).endswith('= 1.30: NOT met)')
    assert inference.verdict_line(0.95, 0.).endswith('= 1.10: met)')
    assert inference.verdict_line(1.12, 0.).endswith('= 1.10: NOT met)')  # f = 0: only the 10% margin

def test_inference_and_compile_scripts_run():
    out = _run('inference.py', '--size', '32x64', '--reps', '1', '--no-reference')
    assert re.search(r'backbone convolutions run (\d+) times .* computed once = True', out), out
    m = VERDICT.search(out)  # the timing itself is not a test condition; the verdict must agree with its numbers
    assert m, out
    r, frac, bound = (float(g) for g in m.groups()[:3])
    assert abs(bound - (1 + frac + 0.1)) <= 0.011, out  # each printed to 2 decimals
    if r != bound:  # equal when rounded: either verdict can be the right one
        assert m.group(4) == ('met' if r < bound else 'NOT met'), out
    out = _run('compile.py', '--reps', '1')
    assert re.search(r'^compile: ', out, re.M), out

"Structure, state-dict mapping, forward and regularizer parity with the original AutoMTL code (bench/parity.py)."
import os, sys
from pathlib import Path
import pytest, torch

ORIGINAL = os.environ.get('AUTOMTL_ORIGINAL')
pytestmark = pytest.mark.skipif(not ORIGINAL or not (Path(ORIGINAL) / 'framework' / 'mtl_model.py').exists(),
                                reason='needs the original AutoMTL tree: set AUTOMTL_ORIGINAL to it '
                                       '(see ../shared/original/README.md)')
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))


@pytest.fixture(scope='module')
def ctx():
    import parity
    torch.set_num_threads(1)
    return parity.build(ORIGINAL, hw=(32, 64))


@pytest.mark.parametrize('name', ['structure', 'mapping', 'forward_fixed', 'forward_pretrain', 'forward_gumbel',
                                  'regularizer'])
def test_parity(ctx, name):
    import parity
    fn = next(f for f in parity.CHECKS if f.__name__ == name)
    res = fn(ctx)
    assert res and all(ok for _, _, ok in res), '\n'.join(f'{ok} {d:.3e} {n}' for n, d, ok in res)


def test_import_original_checkpoint(ctx, tmp_path):
    """A post-train checkpoint as the original trainer saves it (optimizer state included) imports into a run directory
    whose model computes what the original computes."""
    from automtl_nb.original import import_original
    from automtl_nb.compiler import compile_supermodel
    from automtl_nb.models import make_heads
    import parity
    orig, names, x = ctx['orig'], ctx['names'], ctx['x']
    opt = torch.optim.Adam(orig.parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    ck = tmp_path / 'post_train_10iter.model'
    torch.save({'iter': 9, 'state_dict': orig.state_dict(), 'optimizer': opt.state_dict()}, ck)
    run = import_original(ck, ctx['prototxt'], ['segment_semantic=seg', 'depth_zbuffer=depth'], tmp_path / 'run')
    state = torch.load(run / 'checkpoints' / 'posttrain.pt', weights_only=True)
    assert state['done'] and state['it'] == 10 and state['mode'] == 'fixed'
    heads = make_heads({'seg': 19, 'depth': 1}, 512, kind='aspp')
    ours = compile_supermodel(run / 'backbone.prototxt', ['seg', 'depth'], heads, search_bn='after_mix').double()
    ours.set_policy(state['model']['policy']); ours.load_state_dict(state['model']); ours.eval(); orig.eval()
    with torch.no_grad():
        yu = ours(x)
        for t, o in zip(('seg', 'depth'), names): assert parity._rel(orig(x, 'mtl', o, 1., True), yu[t]) <= parity.RTOL


def test_training_parity_float64():
    """Two iterations of every training part on a small input, float64: losses, parameters and BN statistics equal
    the original's to 1e-9 relative (bench/parity_train.py says why Adam's eps is 1e-4 on both sides)."""
    import parity_train
    res = parity_train.train_checks(ORIGINAL, iters=2, hw=(32, 64))
    assert len(res) == 13 and all(ok for _, _, ok in res), '\n'.join(f'{ok} {d:.3e} {n}' for n, d, ok in res)

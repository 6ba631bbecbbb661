"""The baselines under torchrun: AdaShare's policy stage, MTAN and cross-stitch trained by `train_stage` in 2 processes.

usage: torchrun --nproc_per_node 2 baselines_ddp.py OUT_DIR
Each process writes OUT_DIR/rank<r>.pt: per method, its parameters after training with gradient averaging ('synced'),
the same training with `GradSyncCB` switched off ('unsynced', the control), and the sums of the images it was fed."""
import sys
from pathlib import Path
import torch
from automtl_nb import learner
from automtl_nb.learner import (get_config, make_datasets, make_tasks, make_weighting, train_stage, init_distributed,
                                Callback)
from automtl_nb.baselines import make_adashare, adashare_recipe, adashare_setup, make_mtan, make_cross_stitch

class SeenCB(Callback):
    "Record the sum of every image batch this process trains on."
    order = 10
    def __init__(self): self.sums = []
    def after_loss(self): self.sums.append(self.learn.batch['img'].sum().item())

def train(name, cfg, ds, run_dir):
    "Train method `name` for a few iterations; its parameters and the batches it saw."
    tasks, seen = make_tasks(cfg, ds['train']), SeenCB()
    if name == 'adashare':
        r = adashare_recipe(cfg, ds, weight_phase=1, policy_phase=1, curriculum_speed=1)
        torch.manual_seed(0)
        model = make_adashare(cfg, tasks)
        train_stage('policy', cfg, model, tasks, make_weighting(cfg, tasks), ds, run_dir, n_iters=4, cbs=[seen],
                    progress=False, setup=adashare_setup(r))
    else:
        torch.manual_seed(0)
        model = (make_mtan if name == 'mtan' else make_cross_stitch)(cfg, tasks)
        train_stage('posttrain', cfg, model, tasks, make_weighting(cfg, tasks), ds, run_dir, n_iters=3, cbs=[seen],
                    progress=False)
    return {'params': {n: p.detach().clone() for n, p in model.named_parameters()}, 'seen': seen.sums}

def main(out):
    rank, world = init_distributed()
    assert world == 2, world
    cfg = get_config(tasks=('seg', 'depth'), n_train=24, n_val=4, image_size=(16, 16), batch_size=4, lr=1e-2,
                     eval_every=0, ckpt_every=0, device='cpu', num_workers=0)
    ds = make_datasets(cfg)
    res = {}
    for name in ('adashare', 'mtan', 'cross_stitch'):
        res[name] = {'synced': train(name, cfg, ds, Path(out) / name / 'synced')}
    learner.GradSyncCB.after_backward = lambda self: None  # the control: each process steps on its own gradients
    for name in ('adashare', 'mtan', 'cross_stitch'):
        res[name]['unsynced'] = train(name, cfg, ds, Path(out) / name / 'unsynced')
    torch.save(res, Path(out) / f'rank{rank}.pt')

if __name__ == '__main__': main(sys.argv[1])

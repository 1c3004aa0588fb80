"""A workdir resumes only the experiment its checkpoints belong to."""

import pytest

from genimg_jax import checkpoint, train
from conftest import tiny_config


def test_resume_with_another_loss_is_refused_naming_the_field(tmp_path,
                                                              idx_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(idx_dir, "dcgan.py", num_steps=2),
                           workdir)
  changed = tiny_config(idx_dir, "dcgan.py", num_steps=4,
                        **{"gan.loss": "hinge"})
  with pytest.raises(checkpoint.CheckpointError,
                     match="gan.loss: 'non_saturating' -> 'hinge'"):
    train.train_and_evaluate(changed, workdir)
  # A longer run of the same experiment resumes.
  state, _ = train.train_and_evaluate(
      tiny_config(idx_dir, "dcgan.py", num_steps=4), workdir)
  assert int(state.step) == 4

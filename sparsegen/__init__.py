"""sparsegen: the sparsely activated generator of "Inducing Hierarchical Compositional Model by Sparsifying
Generator Network" (CVPR 2020), trained by alternating back-propagation with an energy-based critic.

    from sparsegen import SparseGenerator, EnergyCritic, Trainer, RunConfig
    g = SparseGenerator("paper64")                  # Table 1; sparse=False gives the dense baseline
    y, acts = g(z, return_activations=True)         # acts: layer name -> SparseActivation
    z = sparsegen.langevin_infer(g, images, z, n_steps=20, step_size=0.1, sigma=0.3)

The package follows the data: :mod:`sparsegen.data` (datasets) and :mod:`sparsegen.model` (configs,
generator, critic) -> :mod:`sparsegen.train` (Langevin inference, Algorithm 1, checkpoints) ->
:mod:`sparsegen.readout` (AND-OR trees, basis functions, metrics, report) -> :mod:`sparsegen.cli` (the
command line ``sparsegen train | sample | reconstruct | andor | eval | report``, or ``python -m sparsegen``).
The top-k layers run on the kernels of :mod:`sparsegen_kernels`.
"""
from .data import ImageDataset, load_dataset
from .model.configs import MODEL_CONFIGS, ModelConfig, RunConfig, TrainConfig, model_config
from .model.critic import EnergyCritic, critic_loss
from .model.generator import SparseGenerator
from .train import langevin
from .train.langevin import langevin_infer, log_joint
from .train.trainer import LoadedRun, NonFiniteLossError, Trainer, load_run

__all__ = [
    "EnergyCritic",
    "ImageDataset",
    "LoadedRun",
    "MODEL_CONFIGS",
    "ModelConfig",
    "NonFiniteLossError",
    "RunConfig",
    "SparseGenerator",
    "TrainConfig",
    "Trainer",
    "critic_loss",
    "langevin",
    "langevin_infer",
    "load_dataset",
    "load_run",
    "log_joint",
    "model_config",
]
__version__ = "0.1.0"

"""Random augmentation that depends only on (seed, epoch, image index).

``torchvision.transforms.v2`` draws from the global torch generator, so which flip or scale an
image gets would otherwise depend on the number of processes, the number of loader workers and
the order in which samples are read. Seeding each sample from (seed, epoch, index) makes the
augmented data of an epoch the same for 1 or 8 processes, for 0 or 4 workers, and after a resume.
"""

import torch
from torch.utils.data import Dataset


class SeededDataset(Dataset):
    """Wrap ``dataset`` so that ``dataset[i]`` runs under a generator seeded from (seed, epoch, i).

    Call :meth:`set_epoch` before each epoch (before the loader's workers start).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            return self.dataset[index]

    def __getattr__(self, name: str):
        # Reached only for names not found on the wrapper: expose the dataset's (e.g. ``coco``).
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

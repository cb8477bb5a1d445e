"""Episodic datasets and the DataModules: contract, reproducibility, folds, errors."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from fss.data import (
    FewShotDataModule,
    FewShotSource,
    SemanticDataModule,
    SyntheticSource,
    folds,
)
from fss.data.datamodule import EpochSampler
from fss.data.transforms import IGNORE_INDEX

SIZE = 48


@pytest.fixture(scope="module")
def source() -> SyntheticSource:
    return SyntheticSource(image_size=SIZE)


def make_module(source, **overrides) -> FewShotDataModule:
    args = dict(
        fold=0,
        shot=2,
        train_shot=1,
        batch_size=2,
        test_batch_size=2,
        num_workers=0,
        train_episodes=6,
        val_episodes=5,
        test_episodes=5,
        seed=0,
    )
    args.update(overrides)
    return FewShotDataModule(source, **args)


def collect(loader: DataLoader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_source_implements_the_interface(source):
    assert isinstance(source, FewShotSource)
    assert source.num_classes == 20 and len(source.class_names) == 20
    assert source.fold_scheme == "contiguous" and source.image_size == SIZE
    assert source.name == "synthetic-demo"
    assert source.novel_classes(2) == [10, 11, 12, 13, 14]


def test_episode_contract(source):
    batch = next(iter(make_module(source).val_dataloader()))
    assert batch["query_img"].shape == (2, 3, SIZE, SIZE)
    assert batch["query_img"].dtype == torch.float32
    assert batch["query_mask"].shape == (2, SIZE, SIZE)
    assert batch["query_mask"].dtype == torch.int64
    assert set(batch["query_mask"].unique().tolist()) == {0, 1, IGNORE_INDEX}
    assert batch["support_imgs"].shape == (2, 2, 3, SIZE, SIZE)
    assert batch["support_imgs"].dtype == torch.float32
    assert batch["support_masks"].shape == (2, 2, SIZE, SIZE)
    assert batch["support_masks"].dtype == torch.float32
    assert set(batch["support_masks"].unique().tolist()) == {0.0, 1.0}
    assert batch["support_ignore"].shape == (2, 2, SIZE, SIZE)
    assert batch["support_ignore"].dtype == torch.bool
    assert batch["support_ignore"].any()
    assert not (batch["support_ignore"] & (batch["support_masks"] > 0)).any()
    assert batch["class_id"].shape == (2,) and batch["class_id"].dtype == torch.int64
    assert batch["episode_index"].tolist() == [0, 1]
    # Every support shows the class.
    assert (batch["support_masks"].sum(dim=(2, 3)) > 0).all()
    assert ((batch["query_mask"] == 1).sum(dim=(1, 2)) > 0).all()


def test_support_never_equals_the_query(source):
    episodes = source.episodic("train", 0, shot=3, num_episodes=4, seed=5)
    for index in range(len(episodes)):
        episode = episodes[index]
        for support in episode["support_imgs"]:
            assert not torch.equal(support, episode["query_img"])
        assert not torch.equal(episode["support_imgs"][0], episode["support_imgs"][1])


def test_episodes_identical_for_any_num_workers(source):
    single = make_module(source, num_workers=0)
    multi = make_module(source, num_workers=2, persistent_workers=True)
    assert_same(collect(single.train_dataloader()), collect(multi.train_dataloader()))
    assert_same(collect(single.val_dataloader()), collect(multi.val_dataloader()))


def test_episodes_independent_of_batch_size(source):
    small = collect(make_module(source, batch_size=1).train_dataloader())
    large = collect(make_module(source, batch_size=4).train_dataloader())
    assert_same(small, large)
    small = collect(make_module(source, test_batch_size=1).test_dataloader())
    large = collect(make_module(source, test_batch_size=3).test_dataloader())
    assert_same(small, large)


def test_episodes_identical_across_devices(source):
    """What the training sampler hands each rank is the same episodes, split by index."""
    module = make_module(source)
    dataset = module.train_dataset(epoch=3)
    whole = collect(DataLoader(dataset, batch_size=2))
    for rank in range(2):
        sampler = EpochSampler(module.train_dataset(), rank=rank, world_size=2, epoch=3)
        part = collect(DataLoader(module.train_dataset(), batch_size=2, sampler=sampler))
        indices = part["episode_index"]
        for key in whole:
            assert torch.equal(part[key], whole[key][indices]), key


@pytest.mark.parametrize("count, world", [(10, 3), (6, 2), (5, 4), (3, 1)])
def test_training_shards_are_those_of_distributed_sampler(count, world):
    """Same indices per rank as DistributedSampler(shuffle=False), padding included (DDP
    ranks must take equal step counts), each with the sampler's epoch."""
    dataset = list(range(count))
    for rank in range(world):
        sampler = EpochSampler(dataset, rank=rank, world_size=world, epoch=2)
        expected = list(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False))
        assert list(sampler) == [(2, i) for i in expected] and len(sampler) == len(expected)
        sampler.set_epoch(5)
        assert list(sampler) == [(5, i) for i in expected]


def test_train_episodes_change_every_epoch_val_and_test_do_not(source):
    module = make_module(source)
    epoch0 = (collect(module.train_dataloader()), collect(module.val_dataloader()))
    test0 = collect(module.test_dataloader())
    module.trainer = SimpleNamespace(current_epoch=1)
    epoch1 = (collect(module.train_dataloader()), collect(module.val_dataloader()))
    assert not torch.equal(epoch0[0]["query_img"], epoch1[0]["query_img"])
    assert_same(epoch0[1], epoch1[1])
    assert_same(test0, collect(module.test_dataloader()))
    # Validation and test episodes differ (different seeds).
    assert not torch.equal(epoch0[1]["query_img"], test0["query_img"])
    module.trainer = SimpleNamespace(current_epoch=0)
    assert_same(epoch0[0], collect(module.train_dataloader()))


@pytest.mark.parametrize("fold", range(4))
def test_base_classes_at_train_novel_classes_at_val_and_test(source, fold):
    module = make_module(source, fold=fold, train_episodes=12)
    base, novel = folds.base_classes(fold, 20), folds.novel_classes(fold, 20)
    assert module.base_classes == base and module.novel_classes == novel
    train_classes = [module.train_dataset()[i]["class_id"].item() for i in range(12)]
    assert set(train_classes) <= set(base)
    assert len(set(train_classes)) > 1
    # val/test cycle through the novel classes: every one appears, nothing else.
    for dataset in (module.val_dataset(), module.test_dataset()):
        assert [dataset[i]["class_id"].item() for i in range(5)] == novel


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
@pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers")
def test_training_loop_redraws_episodes_each_epoch_with_persistent_workers(source):
    """The loader is built once and its worker lives across epochs, yet every epoch gets
    exactly the episodes of ``train_dataset(epoch)``."""

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: dict[int, list[torch.Tensor]] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).append(batch["query_img"])
            return (batch["query_img"].mean() * self.weight) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = make_module(source, train_episodes=4, num_workers=1, persistent_workers=True)
    built = []
    original = module.train_dataloader
    module.train_dataloader = lambda: built.append(1) or original()
    recorder = Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(recorder, datamodule=module)
    assert sorted(recorder.seen) == [0, 1, 2]
    for epoch, batches in recorder.seen.items():
        expected = collect(DataLoader(module.train_dataset(epoch=epoch), batch_size=2))
        assert torch.equal(torch.cat(batches), expected["query_img"]), epoch
    assert not torch.equal(torch.cat(recorder.seen[0]), torch.cat(recorder.seen[1]))
    assert len(built) <= 2  # once (plus Lightning's step estimate), not once per epoch


def test_semantic_datamodule(source):
    module = SemanticDataModule(
        source, fold=3, batch_size=3, num_workers=0, num_train_images=4, num_val_images=3
    )
    assert module.num_labels == 16
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (3, SIZE, SIZE) and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= set(range(16)) | {IGNORE_INDEX}
    val = collect(module.val_dataloader())
    module.trainer = SimpleNamespace(current_epoch=1)
    assert not torch.equal(batch["image"], next(iter(module.train_dataloader()))["image"])
    assert_same(val, collect(module.val_dataloader()))
    workers = SemanticDataModule(
        source, fold=3, batch_size=2, num_workers=2, num_train_images=4, num_val_images=3
    )
    assert_same(val, collect(workers.val_dataloader()))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fold": 4}, r"fold must be an integer in 0\.\.3, got 4"),
        ({"fold": -1}, r"fold must be an integer in 0\.\.3"),
        ({"shot": 0}, r"shot must be an integer >= 1, got 0"),
        ({"train_shot": 0}, r"train_shot must be an integer >= 1, got 0"),
        ({"train_episodes": 0}, r"train_episodes must be an integer >= 1, got 0"),
        ({"test_episodes": 0}, r"test_episodes must be an integer >= 1, got 0"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1"),
        ({"num_workers": -1}, r"num_workers must be an integer >= 0"),
    ],
)
def test_invalid_arguments_are_explained(source, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_module(source, **overrides)


def test_invalid_semantic_arguments_and_source(source):
    with pytest.raises(ValueError, match=r"fold must be an integer in 0\.\.3, got 4"):
        SemanticDataModule(source, fold=4)
    with pytest.raises(ValueError, match="num_train_images must be an integer >= 1"):
        SemanticDataModule(source, num_train_images=0)
    with pytest.raises(TypeError, match="source must be a FewShotSource"):
        FewShotDataModule("synthetic")
    with pytest.raises(ValueError, match="shot must be an integer >= 1, got 0"):
        source.episodic("test", 0, shot=0, num_episodes=3, seed=0)


def test_eval_shards_cover_every_episode_exactly_once():
    from fss.data.datamodule import EvalShardSampler

    dataset = list(range(10))  # 10 episodes over 3 ranks: no padding, no repeats
    shards = [list(EvalShardSampler(dataset, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]

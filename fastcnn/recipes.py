"""Per-model default training recipes, taken from the seeds where they say it.

Sources: BIGBALLON/cifar-10-cnn (LeNet, NIN, VGG19, ResNet, WRN, ResNeXt, DenseNet, SENet:
its README table and the Keras scripts' ``scheduler`` functions), Coderx7/SimpleNet_Pytorch
``Cifar/main.py`` (SimpleNet), Springenberg et al. 2014 (All-CNN-C), Shathe/DeepLearning
(ShatheNet epochs). Every field can be overridden on the command line; ``--print-recipe``
shows the resolved values and, in ``notes``, which ones are the seed's and which are ours.

Weight decay: the Keras scripts use ``l2(lambda)`` kernel regularisers, whose gradient is
``2 * lambda * w``; the values below are the papers' / scripts' lambda used directly as
PyTorch ``weight_decay`` (the convention of the PyTorch ports), which is half as strong.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field


@dataclass
class Recipe:
    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam | adamw | adadelta
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # see fastcnn.schedules.SCHEDULES
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    drop_rate: float | None = None  # None: the model's own default
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    source: str = ""
    notes: str = ""

    def replace(self, **kw) -> "Recipe":
        return dataclasses.replace(self, **kw)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d


_BIGBALLON = "BIGBALLON/cifar-10-cnn"
_WD_NOTE = "weight decay = the script's Keras l2 lambda"

#: (pattern, recipe) in order; the first pattern matching the model name wins.
RECIPES: list[tuple[str, Recipe]] = [
    ("lenet*", Recipe(epochs=200, batch_size=128, lr=0.05, weight_decay=1e-4,
                      milestones=(81, 122), gamma=0.1,
                      source=f"{_BIGBALLON} 1_Lecun_Network/LeNet_dp_da_wd_keras.py (76.23%)",
                      notes=f"SGD Nesterov 0.9, LR 0.05 -> 0.005 @81 -> 0.0005 @122, crop+flip; {_WD_NOTE}")),
    ("nin*", Recipe(epochs=200, batch_size=128, lr=0.05, weight_decay=1e-4,
                    milestones=(61, 121, 161), gamma=0.2, drop_rate=0.5,
                    source=f"{_BIGBALLON} 2_Network_in_Network/Network_in_Network_bn_keras.py (91.63%)",
                    notes=f"LR 0.05, x0.2 after epochs 60/120/160, dropout 0.5; {_WD_NOTE}")),
    ("vgg*", Recipe(epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, milestones=(81, 121),
                    drop_rate=0.5,
                    source=f"{_BIGBALLON} 3_Vgg19_Network/Vgg19_keras.py (93.53%)",
                    notes="LR 0.1, x0.1 after 80/120, dropout 0.5; 200 epochs per the README table "
                          "(script: 170, fine-tuned from ImageNet weights; here from scratch)")),
    ("resnet164", Recipe(epochs=200, batch_size=128, lr=0.1, weight_decay=1e-4, milestones=(81, 122),
                         source=f"{_BIGBALLON} 4_Residual_Network/ResNet_keras.py (pre-activation)",
                         notes="LR 0.1, x0.1 @81, @122; He et al. 2016b wd 1e-4")),
    ("resnet*", Recipe(epochs=200, batch_size=128, lr=0.1, weight_decay=1e-4, milestones=(81, 122),
                       source=f"{_BIGBALLON} 4_Residual_Network/ResNet_keras.py (ResNet-20/32/110: "
                              "91.82/92.68/93.93%)",
                       notes="LR 0.1, x0.1 @81, @122 (He et al.: 32k/48k iterations); wd 1e-4 as the paper")),
    ("wrn*", Recipe(epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, milestones=(60, 120, 160),
                    gamma=0.2,
                    source=f"{_BIGBALLON} 5_Wide_Residual_Network/Wide_ResNet_keras.py "
                           "(WRN-16-8 95.13%, WRN-28-10 95.78%)",
                    notes="LR 0.1, x0.2 @60/120/160, wd 5e-4 (Zagoruyko & Komodakis); "
                          "dropout 0.3 optional via --drop-rate")),
    ("*resnext*", Recipe(epochs=250, batch_size=120, lr=0.1, weight_decay=5e-4, milestones=(150, 225),
                         source=f"{_BIGBALLON} 6_ResNeXt / 8_SENet (ResNeXt-4x64d 95.19%, SE 95.60%)",
                         notes="LR 0.1, x0.1 @150/225; batch 120 and 250 epochs per the README table "
                               "(the script has 64 / 300)")),
    ("densenet*", Recipe(epochs=250, batch_size=64, lr=0.1, weight_decay=1e-4, milestones=(150, 225),
                         source=f"{_BIGBALLON} 7_DenseNet/DenseNet_keras.py (94.91/95.30/95.90%)",
                         notes="LR 0.1, x0.1 @150/225, batch 64; 250 epochs per the README table "
                               "(the script and the paper: 300)")),
    ("simplenet*", Recipe(epochs=700, batch_size=64, optimizer="adadelta", lr=0.1, weight_decay=1e-3,
                          milestones=(100, 190, 306, 390, 440, 540), gamma=0.1, nesterov=False,
                          source="Coderx7/SimpleNet_Pytorch Cifar/main.py (CIFAR-10 95.51% with crop+flip)",
                          notes="Adadelta lr 0.1 rho 0.9 eps 1e-3, wd 1e-3, x0.1 at "
                                "100/190/306/390/440/540; the Keras port reached 94% in 125 epochs. "
                                "simplenetv1_* are ImageNet nets: no CIFAR recipe in the seeds, this one is used")),
    ("allcnn*", Recipe(epochs=350, batch_size=128, lr=0.1, nesterov=False, weight_decay=1e-3,
                       milestones=(200, 250, 300), drop_rate=0.5,
                       source="Springenberg et al. arXiv 1412.6806 (All-CNN-C)",
                       notes="SGD momentum 0.9, LR 0.1 x0.1 @200/250/300, wd 1e-3, dropout 0.5; "
                             "batch 128 is our choice (not stated by the seed)")),
    ("shathenet_v1_0", Recipe(epochs=60, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                              schedule="constant", nesterov=False, crop_padding=0, flip=False,
                              source="Shathe/DeepLearning ShatheNet v1.0 (59%, 60 epochs, no augmentation)",
                              notes="epochs and augmentation from the seed; Adam 1e-3 batch 64 are our "
                                    "choice (the seed does not state them)")),
    ("shathenet*", Recipe(epochs=70, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                          schedule="constant", nesterov=False,
                          source="Shathe/DeepLearning ShatheNet v1.1 (74%, 70 epochs, augmentation)",
                          notes="epochs and augmentation from the seed; Adam 1e-3 batch 64 are our choice")),
]

DEFAULT = Recipe(epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="cosine",
                 source="fastcnn default (no seed recipe for this model)",
                 notes="SGD Nesterov 0.1, cosine to 0, wd 5e-4, crop+flip")


def get_recipe(model_name: str) -> Recipe:
    """The default recipe for ``model_name`` (a copy: changing it changes nothing else)."""
    for pattern, recipe in RECIPES:
        if fnmatch.fnmatch(model_name, pattern):
            return recipe.replace()
    return DEFAULT.replace()


def format_recipe(model_name: str, recipe: Recipe, dataset: str | None = None) -> str:
    """A readable block: one ``field: value`` per line, then the source and notes."""
    d = recipe.as_dict()
    source, notes = d.pop("source"), d.pop("notes")
    width = max(len(k) for k in d)
    lines = [f"recipe for {model_name}" + (f" on {dataset}" if dataset else "") + ":"]
    for k, v in d.items():
        lines.append(f"  {k:<{width}}  {v}")
    lines.append(f"  source: {source}")
    if notes:
        lines.append(f"  notes:  {notes}")
    return "\n".join(lines)

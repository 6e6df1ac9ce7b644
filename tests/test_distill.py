from pathlib import Path

import torch

from remedis.adapt.distill import distill, teacher_probabilities
from remedis.adapt.model import AdaptedModel
from remedis.config import RuntimeConfig
from remedis.data.dataset import ImageCache
from remedis.data.manifest import Record
from remedis.data.preprocess import Preprocessing
from remedis.models import Classifier


def bright_dark(n, size=24, seed=0):
    """Trivially separable: label 1 = bright image, 0 = dark image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    pixels = (0.2 + 0.6 * labels[:, None, None, None] + 0.05 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    recs = [Record(Path(f"/x/{i}.png"), ["dark", "bright"][int(lab)], "s", f"p{i}") for i, lab in enumerate(labels)]
    return ImageCache(recs, pixels.half(), Preprocessing(size)), labels



def test_student_matches_teacher_on_separable_task():
    torch.manual_seed(0)
    images, labels = bright_dark(32, size=16)
    val, _ = bright_dark(8, size=16, seed=1)
    teacher = AdaptedModel(Classifier("resnet18", 2), ["bright", "dark"], Preprocessing(16), positive_index=0)
    # Make the teacher a correct classifier of the rule: train its head on the true labels briefly.
    opt = torch.optim.Adam(teacher.classifier.parameters(), lr=1e-3)
    x = images.preprocessing.normalize(images.pixels.float())
    y = 1 - labels  # class 0 = bright
    teacher.classifier.train()
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher.classifier(x), y).backward()
        opt.step()
    teacher.classifier.eval()
    teacher_pred = teacher_probabilities(teacher, images).argmax(1)
    assert (teacher_pred == y).float().mean() > 0.95
    student = distill(teacher, images, val, "resnet18", epochs=6, lr=2e-3, batch_size=16,
                      runtime=RuntimeConfig(precision="fp32"), seed=0)
    agree = (teacher_probabilities(student, images).argmax(1) == teacher_pred).float().mean()
    assert agree >= 0.95
    assert student.architecture == "resnet18" and student.threshold is not None
    assert student.provenance["distilled_from"] == "resnet18"


def test_student_sees_only_the_budgets_labels_and_starts_from_the_backbone(tmp_path):
    from remedis.models.backbones import create_backbone
    from remedis.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    images, _ = bright_dark(32, size=16)
    val, _ = bright_dark(8, size=16, seed=1)
    teacher = AdaptedModel(Classifier("resnet18", 2), ["bright", "dark"], Preprocessing(16), positive_index=0)
    backbone = create_backbone("resnet18", 1)
    save_checkpoint(tmp_path / "bb", backbone.state_dict(), {"kind": "backbone", "architecture": "resnet18", "in_chans": 1,
                                                             "preprocessing": Preprocessing(16).to_dict()})
    budget = [r.image for r in images.records[:5]]  # the teacher's 5 labeled images; the other 27 labels stay unseen
    student = distill(teacher, images, val, "resnet18", epochs=1, lr=1e-12, batch_size=16,
                      runtime=RuntimeConfig(precision="fp32"), seed=0, init=tmp_path / "bb", labeled_images=budget)
    assert student.provenance["distill_labeled_images"] == 5
    assert student.provenance["distill_init"] == str(tmp_path / "bb")
    start = backbone.state_dict()
    convs = [k for k, v in start.items() if k.endswith("weight") and v.ndim == 4]
    got = student.classifier.backbone.state_dict()
    assert convs and all(torch.allclose(got[k].float(), start[k].float(), atol=1e-6) for k in convs)  # started from it
    cold = distill(teacher, images, val, "resnet18", epochs=1, lr=1e-12, batch_size=16,
                   runtime=RuntimeConfig(precision="fp32"), seed=0)
    assert cold.provenance["distill_labeled_images"] == 0 and cold.provenance["distill_init"] == "random"
    assert not all(torch.allclose(cold.classifier.backbone.state_dict()[k].float(), start[k].float()) for k in convs)

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import ssd_helpers as H

# Hypothesis profiles (tests/test_fuzz.py): "default" is quick enough for `make test`;
# HYPOTHESIS_PROFILE=long runs about a thousand examples per property.
# The default profile draws the same examples on every run (derandomize), so `make test` does not
# pass or fail by chance; the long one explores anew and keeps what it finds in .hypothesis/.
settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", settings.get_profile("default"), max_examples=1000,
                          derandomize=False, database=settings.default.database)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def anchors():
    """TinySSD's 5444 anchors for a 256x256 input: (1, 5444, 4)."""
    net = H.TinySSD()
    with torch.no_grad():
        return net(torch.zeros(1, 3, 256, 256))[0]


def random_labels(generator, batch, num_gt, num_classes=3, num_padding=0):
    """Seeded random labels (batch, num_gt + num_padding, 5); padding rows are all -1."""
    centers = torch.rand(batch, num_gt, 2, generator=generator) * 0.8 + 0.1
    sizes = torch.rand(batch, num_gt, 2, generator=generator) * 0.35 + 0.03
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1).clamp(0, 1)
    classes = torch.randint(0, num_classes, (batch, num_gt, 1), generator=generator).float()
    labels = torch.cat([classes, boxes], dim=-1)
    padding = torch.full((batch, num_padding, 5), -1.0)
    return torch.cat([labels, padding], dim=1)

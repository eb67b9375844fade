"""Building and using a model prints no deprecation warnings of the libraries we call."""
import warnings

import numpy as np
from tiny import tiny_harmonifuse


def test_building_and_analyzing_raises_no_deprecation_warning_from_our_calls():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tiny_harmonifuse()
        model.eval()
        model.analyze([np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1])
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and any(lib in w.filename for lib in ("transformers", "peft", "harmonifuse"))]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]

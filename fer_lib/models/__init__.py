"""The model zoo: every architecture of the experiment reports, the record holders and ours.

    from fer_lib.models import create_model, list_models, model_info
    model = create_model("exp3_cnn", hidden_dim=64, dropout_rate=0.2)

Input: float tensor (B, in_chans, 48, 48), already normalised; output: raw logits
(B, num_classes). Importing this package imports the family modules so that their factories
register; it builds no model.
"""
# The family modules are imported for their registration side effect (their factories are
# decorated with @register_model); they also stay reachable as fer_lib.models.report003 etc.
from fer_lib.models import fernet, records, report000, report001, report002, report003, report004  # noqa: F401
from fer_lib.models.registry import create_model, list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model"]

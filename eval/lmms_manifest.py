"""lmms-eval registration (entry point group `lmms_eval.models`, declared in pyproject.toml).

After `pip install -e ".[eval]"`, `lmms-eval eval --model semhitok --model_args pretrained=DIR` finds it.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="semhitok", simple_class_path="semhitok.eval.lmms_model.SemHiTokLMMS", aliases=("semhitok_mllm",))

"""The library below the stages: what more than one stage needs, and nothing that knows a stage.

backbone (frozen LM, embedded models, the dtype/device rule), the domain prompt (its parameterisation
and file), generation (one engine factory, the HF and vLLM engines, chat generation, code in an
answer), the sandbox, benchmarks and domains, records/lineage/locking/provenance/progress, config
and the Lightning helpers. No module here imports a stage package (training, synthesis, curation,
finetune, evaluation, data_quality, study) or the stage table; tests/test_structure.py checks it.
"""

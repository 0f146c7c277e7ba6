"""Host-independence for the trainer tests: what makes a run use the CPU (gloo, fp32) on a CUDA machine too."""

# For subprocesses (python trainer/main.py, torchrun): the golden values are CPU values, torchrun tests use gloo.
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": ""}

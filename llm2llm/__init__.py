"""LLM2LLM building blocks: graders, the teacher prompt and its parser, novelty checks, trainers.

LLM2LLM (Lee et al. 2024, "LLM2LLM: Boosting LLMs with Novel Iterative Data Enhancement",
arXiv:2403.15042; reference code SqueezeAILab/LLM2LLM) grows a small seed set where a student
model is weak: train the student, find the seeds it gets wrong, have a teacher write new
examples like those, repeat. This package holds the parts the loop (a Prefect flow) is built
from; each module is usable and tested on its own:

- :mod:`thresher.llm2llm.graders`: is a student's answer right? (GSM8K, exact, regex, label)
- :mod:`thresher.llm2llm.teacher_prompt`: the chat messages that ask the teacher for ``m`` new
  examples like a wrong seed;
- :mod:`thresher.llm2llm.parse`: the teacher's output as items, or typed failure reasons;
- :mod:`thresher.llm2llm.novelty`: near-copy (ROUGE-L) and held-out overlap rejection;
- :mod:`thresher.llm2llm.trainer`: train a student on the pipeline's Parquet (TRL in-process,
  or an external command).
"""

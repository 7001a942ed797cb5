"""Batch jobs over files of OpenAI Batch API requests: lazy reading, resume, output.

`jobs` reads and checks the input and the output (no torch, no model); `runner` runs the
requests through the continuous-batching scheduler with the server's request code
(gptneo_cli.api); `ray_job` runs the same runner on a Ray cluster. Only `ray_job` imports
ray, and only when called.
"""

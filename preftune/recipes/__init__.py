"""One thin module per algorithm: load, build the task, run the loop, save (``online`` holds the online step
that PPO, GRPO/RLOO and online DPO share)."""

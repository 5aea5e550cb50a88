"""SlimMoE components: the stage config, sensitivity scores, expert-slimming surgery, distillation losses, the Ray Train loop."""

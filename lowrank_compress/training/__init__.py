"""The finetune loop and the methods it calls (`finetune.py` puts them together).

data.py           packing the text, the seeded batch order
methods.py        `TrainingMethod`: the fixed points the loop calls (like transformers' TrainerCallback or
                  llm-compressor's modifiers), and which methods a run's settings ask for
loop.py           the steps: micro-batches, gradients, optimizer, schedule, the methods' hooks
state.py          checkpoints through accelerate's save_state / load_state, plus a small state.json
outputs.py        writing OUT: PEFT adapters, merged factors
trp.py            TRP: the nuclear-norm regularizer and energy truncation of trained factors (--train factors)
lorae.py          LoRAE's regularizer: the exact nuclear norm of each trained low-rank product (--low-rank-reg)
lora_pro.py       LoRA-Pro's adjusted gradients (--optimizer lora-pro)
gora.py           GoRA's ranks and gradient init (--init gora)
rank_schedule.py  AdaLoRA (peft's) and ElaLoRA: ranks pruned / expanded during training (--rank-schedule)
ard.py            ARD-LoRA: learned per-layer scales that set the ranks (--rank-schedule ard)
"""

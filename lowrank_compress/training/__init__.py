"""The finetune loop and the methods it calls (`finetune.py` puts them together).

data.py     packing the text, the seeded batch order
methods.py  `TrainingMethod`: the fixed points the loop calls (like transformers' TrainerCallback or
            llm-compressor's modifiers), and which methods a run's settings ask for
trp.py      TRP's nuclear-norm regularizer and energy truncation of trained factors
loop.py     the steps: micro-batches, gradients, optimizer, schedule, the methods' hooks
state.py    checkpoints through accelerate's save_state / load_state, plus a small state.json
outputs.py  writing OUT: PEFT adapters, merged factors
"""

"""The trainers: pretrain (toy base model), reward / cost model, SFT baseline, PPO."""

"""Pure tensor math for RLHF: PPO (``ppo``) and Bradley-Terry reward modelling (``bradley_terry``).

Import from the submodules directly; nothing is re-exported here.
"""

"""HyperDreamBooth: pre-optimised LiDB weights, the hypernetwork, and fast fine-tuning."""

"""``redrafter bench``: ReDrafter and its alternatives measured side by side in one run."""

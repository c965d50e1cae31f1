"""The fault suite (`make faults`): each scenario injects one fault and is judged against an independent oracle."""

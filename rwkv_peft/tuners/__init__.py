"""Our tuners beside peft (see ``state_tuning.py`` for why state tuning is not a registered peft method)."""
from .state_tuning import (
    STATE_FILE, STATE_LAYOUT, StateMismatchError, StateTuningConfig, add_initial_state, apply_state_tuning,
    check_state_version, combine_states, export_state_pth, get_states, load_state_any, load_state_pth,
    read_state_file, save_state_file, set_states,
)

__all__ = ["STATE_FILE", "STATE_LAYOUT", "StateMismatchError", "StateTuningConfig", "add_initial_state",
           "apply_state_tuning", "check_state_version", "combine_states", "export_state_pth", "get_states",
           "load_state_any", "load_state_pth", "read_state_file", "save_state_file", "set_states"]

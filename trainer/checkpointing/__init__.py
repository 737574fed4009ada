"""Checkpoints and run state: when to save, what is saved, how a run resumes, and who owns the folder.

========================  =====================================================================
``manager.py``            :class:`CheckpointManager`: the loop calls ``maybe_save`` after every step;
                          it decides (stop signal, step and wall-clock cadence, background saves)
``checkpoint.py``         :class:`Checkpointer`: atomic, verifiable directory checkpoints, auto-resume
``checkpoint_marker.py``  ``COMPLETE.json``: what makes a checkpoint folder whole
``run_state.py``          what a checkpoint holds besides model / optimizer (``Stateful`` objects)
``resume_check.py``       which config changes a resumed run may make (declared on each config field)
``interrupts.py``         preemption: stop signals recorded, not fatal; the wall-clock save clock
``stop_record.py``        what a stop signal leaves behind when its checkpoint never became whole
``selection.py``          the best-on-validation checkpoint beside the final model
``safe_dcp.py``           DCP metadata read without running code from the checkpoint folder
``slow_storage.py``       every checkpoint file write, with an optional slow-storage stand-in
``disk_space.py``         free space checked before a save and named when one fails
``run_lock.py``           one job per run folder (``<out_dir>/.geoprime.lock``)
========================  =====================================================================

Nothing is imported here, so torch-free callers (``launch``) may import the light modules alone.
"""

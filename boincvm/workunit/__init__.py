"""Workunits: make them from a vm job, inputs and templates (:mod:`.make`), read a made workunit
directory back (:mod:`.directory`), and read BOINC input/output templates (:mod:`.templates`,
the one reader of them).
"""

"""App versions: the model and version.xml (:mod:`.model`), package-image (:mod:`.build`),
VMware VM directories (:mod:`.vmware`), checking a made one (:mod:`.check`) and the wrapper as
one zip application (:mod:`.zipapp`).
"""

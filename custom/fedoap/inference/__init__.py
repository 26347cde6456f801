"""After the federation: a site's personalized model as a self-describing file, applied to new scans
(``fedoap predict``), scored on labelled cases (``fedoap evaluate``) and exported as a MONAI bundle
(``fedoap export-bundle``)."""

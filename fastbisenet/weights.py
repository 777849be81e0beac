def load_pretrained(*a): pass
def load_backbone_weights(*a): pass

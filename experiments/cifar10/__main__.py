from experiments.cifar10.main import main

if __name__ == "__main__":
  main()
